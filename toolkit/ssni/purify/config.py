"""PurifierConfig (typed, loadable from YAML) and `build_purifier`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from ..config import ConfigError, from_dict
from .purifier import Purifier


@dataclass
class PurifierConfig:
    """Purification settings; each sampler reads the fields it uses and ignores the rest."""

    sampler: str = "diffpure"       # diffpure | ddpm | ddim | gdmp | gns (see SAMPLERS)
    dt: float = 1e-3                # diffpure: SDE step size (t* = 0.1 -> 100 steps)
    steps: Optional[int] = None     # ddpm/ddim/gdmp: reverse steps per sample; None = every step
    stages: List[float] = field(default_factory=lambda: [0.5, 1.0])  # gns: multiples of t*
    inner: str = "ddpm"             # gns: the sampler run in each stage
    guidance_scale: float = 10.0    # gdmp: pull of each step towards the input
    clip: bool = True               # discrete samplers: clip x0 predictions to [-1, 1]
    grad: str = "full"              # default gradient mode: full | bpda | surrogate
    checkpoint: bool = True         # full gradients: checkpoint every reverse step
    surrogate: Optional[Dict[str, Any]] = None  # field overrides for the attack's surrogate


def _kwargs(cfg: PurifierConfig) -> Dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d.pop("surrogate")
    return d


def build_purifier(score_model: nn.Module, cfg: Optional[PurifierConfig] = None,
                   **overrides: Any) -> Purifier:
    """Purifier for `score_model` from cfg (defaults if None) plus field overrides; a surrogate
    is built from cfg.surrogate (overrides of the same fields) next to the defense settings."""
    cfg = cfg or PurifierConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    surrogate = None
    if cfg.surrogate:
        base = _kwargs(cfg)
        base["grad"] = "full"  # the surrogate exists to be differentiated
        sub = from_dict(PurifierConfig, {**base, **cfg.surrogate}, where="surrogate")
        if sub.surrogate:
            raise ConfigError("surrogate: a surrogate cannot have its own surrogate")
        surrogate = Purifier(score_model, **_kwargs(sub))
    return Purifier(score_model, surrogate=surrogate, **_kwargs(cfg))
