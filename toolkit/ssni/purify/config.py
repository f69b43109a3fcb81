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

    def __post_init__(self) -> None:
        # the sampler and its options are checked when the config is built (from a recipe or an
        # override), before any network loads: building a sampler is cheap and network-free
        SAMPLERS.get(self.sampler).from_options(self.sampler, **self.sampler_options())

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
    """Purifier for `score_model` from cfg (defaults if None) plus field overrides.

    Example::

        >>> import torch
        >>> from ssni import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("unet_tiny")  # 8x8 grey; an untrained net's last layer is zero: perturb it
        >>> with torch.no_grad():
        ...     _ = [p.add_(0.02 * torch.randn_like(p)) for p in net.parameters()]
        >>> from ssni import PurifierConfig, build_purifier
        >>> purifier = build_purifier(net, PurifierConfig(sampler="ddpm", steps=2))
        >>> x = torch.rand(4, 1, 8, 8)                       # images in [0, 1]
        >>> with torch.no_grad():                            # a different t* per image
        ...     out = purifier(x, torch.tensor([0.05, 0.1, 0.1, 0.2]), seeds=torch.arange(4))
        >>> tuple(out.shape), purifier.nfe_last              # 2 DDPM steps for each of 4 images
        ((4, 1, 8, 8), 8)
    """
    cfg = cfg or PurifierConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return Purifier(score_model, cfg.sampler, grad=cfg.grad, checkpoint=cfg.checkpoint,
                    **cfg.sampler_options())
