"""Noise samplers for training (DSM and denoisers): `sampler(shape, generator, device) -> [B, ...]`.

Registered: `gaussian` (here) and `typical_set` (ssni.typical).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .registry import Registry

NOISE_SAMPLERS = Registry("noise sampler")


@dataclass
class NoiseConfig:
    """A registered noise sampler and its keyword arguments."""

    name: str = "gaussian"
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        NOISE_SAMPLERS.check_options(self.name, self.kwargs, "noise.kwargs")  # when the recipe loads


@NOISE_SAMPLERS.register("gaussian")
class GaussianNoise:
    """Standard Gaussian noise, the usual DSM choice: shape -> N(0, I) of that shape."""

    def __call__(self, shape, generator: Optional[torch.Generator], device) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)


def build_noise(cfg: NoiseConfig) -> Any:
    """The noise sampler named by `cfg`."""
    return NOISE_SAMPLERS.create(cfg.name, **cfg.kwargs)
