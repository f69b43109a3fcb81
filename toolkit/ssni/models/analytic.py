"""An exact score model for Gaussian data, for tests that need the true score at every t.

Data x0 ~ N(m, s^2 I) in model space gives, under the VP process, x_t ~ N(sqrt(ab) m,
(ab s^2 + 1 - ab) I), so the exact noise prediction is
    eps(x_t, t) = sigma(t) * (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab).
With this network in place of a trained one, a sampler's output distribution can be checked
against N(m, s^2 I) directly.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..diffusion import VPDiffusion, per_sample
from .base import EpsModel


class GaussianScoreModel(EpsModel):
    """Exact eps for data N(mean, std^2) per pixel; forward(x [B,C,H,W], t [B]) -> eps [B,C,H,W].

    `mean` and `std` are numbers or tensors broadcastable to `shape` (C, H, W), in model space
    [-1, 1]; they are buffers, so `.to(device)` and `.double()` move them with the module.
    """

    def __init__(self, mean: float | Tensor = 0.0, std: float | Tensor = 1.0,
                 shape: Sequence[int] = (1, 8, 8), diffusion: VPDiffusion | None = None):
        super().__init__(diffusion)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).expand(shape).clone()
        std_t = torch.as_tensor(std, dtype=torch.float32).expand(shape).clone()
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
            raise ValueError("mean and std must be finite")
        if (std_t < 0).any():
            raise ValueError(f"std must be >= 0, got min {std_t.min().item()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.shape = shape
        self.in_channels = shape[0]
        self.image_size = shape[1]
        self.config = dict(shape=list(shape))

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the modelled data."""
        return self.shape  # type: ignore[return-value]

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if x [B,C,H,W] does not have the modelled shape."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Gaussian score model was built for images of shape "
                             f"[B, {', '.join(map(str, self.shape))}], got {list(x.shape)}")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact eps; x: [B,C,H,W] in model space, t: [B] in [0, 1] -> [B,C,H,W]."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t = t.to(x.dtype)  # the closed form is evaluated in the caller's precision
        d = self.diffusion
        ab = per_sample(d.alpha_bar(t), x)
        sig = per_sample(d.sigma(t), x)
        m, s2 = self.mean.to(x.dtype), self.std.to(x.dtype) ** 2
        return sig * (x - torch.sqrt(ab) * m) / (ab * s2 + 1.0 - ab)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of the data x0 ~ N(mean, std^2) in model space; returns [n,C,H,W]."""
        z = torch.randn((n, *self.shape), generator=generator, device=self.mean.device)
        return self.mean + self.std * z
