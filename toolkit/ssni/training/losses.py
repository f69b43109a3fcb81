"""Training losses: callables `loss(net, batch, generator) -> per-sample loss [B]`."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion import VPDiffusion, to_model_space
from ..registry import Registry

NOISE_SAMPLERS = Registry("noise sampler")


@NOISE_SAMPLERS.register("gaussian")
class GaussianNoise:
    """Standard Gaussian noise, the usual DSM choice: shape -> N(0, I) of that shape."""

    def __call__(self, shape, generator: Optional[torch.Generator], device) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)


class DSMLoss:
    """Denoising score matching with eps-prediction on the continuous VP process.

    batch: (images [B,C,H,W] in [0,1], labels); t ~ U(t_eps, 1) per sample; returns [B].
    """

    def __init__(self, diffusion: VPDiffusion | None = None, t_eps: float = 1e-3,
                 noise: Callable | None = None):
        self.diffusion = diffusion
        self.t_eps = t_eps
        self.noise = noise or GaussianNoise()

    def __call__(self, net: nn.Module, batch: Tuple[Tensor, ...],
                 generator: Optional[torch.Generator] = None) -> Tensor:
        x0 = to_model_space(batch[0])
        diffusion = self.diffusion or getattr(net, "module", net).diffusion
        b = x0.shape[0]
        t = self.t_eps + (1 - self.t_eps) * torch.rand(b, generator=generator, device=x0.device)
        eps = self.noise(x0.shape, generator, x0.device).to(x0.dtype)
        xt = diffusion.q_sample(x0, t, eps)
        pred = net(xt, t)
        return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)


class CrossEntropyLoss:
    """Per-sample cross-entropy for classifiers; batch: (images, labels) -> [B]."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, net: nn.Module, batch, generator=None) -> Tensor:
        logits = net(batch[0])
        return F.cross_entropy(logits.float(), batch[1], reduction="none",
                               label_smoothing=self.label_smoothing)
