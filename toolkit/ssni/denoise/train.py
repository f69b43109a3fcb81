"""Denoiser training pieces (for `ssni train-denoiser`): the loss on Gaussian or TS noise, fixed test
observations, quality on a test set, and the denoiser factory."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..models import MODELS, ModelConfig, create_model, list_models
from ..noise import GaussianNoise
from .metrics import psnr, ssim


class DenoiseLoss:
    """Per-sample MSE of a denoiser on x + (sigma/255) * noise; batch: (x [B,C,H,W], _) -> [B].

    `noise` is a noise sampler (shape, generator, device) -> unit-std-like noise (Gaussian or
    TS), so TS training moves a share of the noisy patches off the typical shell.
    """

    def __init__(self, sigma: float, noise: Optional[Callable] = None):
        if not 0 < sigma < 255:
            raise ValueError(f"sigma is the noise std on the 0..255 scale, expected (0, 255), got {sigma}")
        self.sigma = float(sigma)
        self.noise = noise or GaussianNoise()

    def __call__(self, net: nn.Module, batch: Tuple[Tensor, ...],
                 generator: Optional[torch.Generator] = None) -> Tensor:
        x = batch[0]
        y = x + (self.sigma / 255.0) * self.noise(x.shape, generator, x.device).to(x.dtype)
        return (net(y).float() - x.float()).pow(2).flatten(1).mean(1)


def noisy_observation(x: Tensor, sigma: float, seed: int) -> Tensor:
    """x + N(0, (sigma/255)^2) with noise fixed by `seed` (same draw whatever the batching)."""
    g = torch.Generator().manual_seed(int(seed))
    return x + (sigma / 255.0) * torch.randn(x.shape, generator=g).to(x.device, x.dtype)


@torch.no_grad()
def denoise_quality(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4) -> Dict[str, float]:
    """Mean PSNR / SSIM of model(y) (clipped to [0,1]) against x; x, y: [N,C,H,W]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [model(y[k:k + batch_size].to(device)).clamp(0, 1).cpu()
            for k in range(0, len(y), batch_size)]
    model.train(was_training)
    out = torch.cat(outs)
    return {"psnr": psnr(out, x).mean().item(), "ssim": ssim(out, x).mean().item()}


def build_denoiser(cfg: ModelConfig, in_channels: int, sigma: float) -> nn.Module:
    """Create a registered denoiser (kind 'denoiser') for `in_channels` at `sigma` (/255)."""
    if cfg.name not in list_models(kind="denoiser"):
        MODELS.get(cfg.name)  # unknown names: the registry's error lists every model
        raise ValueError(f"model {cfg.name!r} is not a denoiser; choose one of "
                         f"{', '.join(list_models(kind='denoiser'))}")
    return create_model(cfg.name, **{"in_channels": in_channels, "sigma": sigma, **cfg.kwargs})
