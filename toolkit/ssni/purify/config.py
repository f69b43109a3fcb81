"""PurifierConfig (typed, loadable from YAML) and `build_purifier`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import nn

from ..config import setting
from .purifier import Purifier
from .samplers import SAMPLERS


@dataclass
class PurifierConfig:
    """Purification settings: the sampler, its own options, and how gradients flow.

    Sampler options left at None take the sampler's default; setting one that the chosen sampler
    does not take is an error listing the options it does (see each sampler's docstring).
    """

    sampler: str = "diffpure"                # diffpure | vpode | ddpm | ddim | gdmp | gns (see SAMPLERS)
    grad: str = "full"                       # default gradient mode: full | bpda
    checkpoint: bool = True                  # full gradients: checkpoint every reverse step
    # -- sampler options ----------------------------------------------------------------------
    dt: Optional[float] = setting(None, gt=0, le=1)  # diffpure/vpode: SDE/ODE step size (default 1e-3: t* 0.1 = 100 steps)
    steps: Optional[int] = setting(None, ge=1)       # ddpm/ddim/gdmp: reverse steps per sample (default: every step)
    clip: Optional[bool] = None              # ddpm/ddim/gdmp: clip x0 predictions to [-1, 1] (default true)
    guidance_scale: Optional[float] = setting(None, ge=0)  # gdmp: pull of each step towards the input (default 10)
    stages: Optional[List[float]] = setting(None, gt=0)  # gns: multiples of t* (default [0.5, 1.0])
    inner: Optional[str] = None              # gns: the sampler run in each stage (default ddpm)

    def sampler_options(self) -> Dict[str, Any]:
        """The sampler options that are set (not None)."""
        skip = ("sampler", "grad", "checkpoint")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


def sampler_option_names(name: str) -> List[str]:
    """The options the registered sampler `name` takes."""
    return SAMPLERS.get(name).option_names()


def build_purifier(score_model: nn.Module, cfg: Optional[PurifierConfig] = None,
                   **overrides: Any) -> Purifier:
    """Purifier for `score_model` from cfg (defaults if None) plus field overrides."""
    cfg = cfg or PurifierConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return Purifier(score_model, cfg.sampler, grad=cfg.grad, checkpoint=cfg.checkpoint,
                    **cfg.sampler_options())
