"""Denoisers at a fixed noise level: DnCNN, and a U-Net used as a denoiser.

Interface (both): forward(y [B,C,H,W]) -> x_hat [B,C,H,W], pixel scale (clean images in [0, 1];
the noisy y is not clipped). `sigma` is the noise std on the 0..255 scale the model is meant for;
`config` holds the keyword arguments that rebuild it with `create_model`. Registered with
kind="denoiser" so that loops over score networks leave them out.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .factory import register_model
from .unet import UNet


class Denoiser(nn.Module):
    """Base class: input checks shared by the denoisers."""

    in_channels: int
    sigma: float
    config: Dict[str, Any]

    def check_input(self, y: Tensor) -> None:
        """Raise a clear error if y is not [B, in_channels, H, W] and finite."""
        if y.dim() != 4 or y.shape[1] != self.in_channels:
            raise ValueError(f"denoiser expects images of shape [B, {self.in_channels}, H, W], "
                             f"got {list(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("denoiser input holds NaN/Inf values; expected finite pixels")


def _check_sigma(sigma: float) -> float:
    if not (0 < float(sigma) < 255):
        raise ValueError(f"sigma is the noise std on the 0..255 scale, expected (0, 255), got {sigma!r}")
    return float(sigma)


class DnCNN(Denoiser):
    """DnCNN: conv+ReLU, (depth-2) x conv+BN+ReLU, conv; predicts the noise (residual learning).

    forward(y [B,C,H,W]) -> y - noise_hat, [B,C,H,W].
    """

    def __init__(self, in_channels: int = 1, depth: int = 17, width: int = 64,
                 batch_norm: bool = True, sigma: float = 25.0):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2 (first and last conv), got {depth}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be >= 1, got {width}, {in_channels}")
        self.in_channels, self.sigma = int(in_channels), _check_sigma(sigma)
        self.config = dict(in_channels=int(in_channels), depth=int(depth), width=int(width),
                           batch_norm=bool(batch_norm), sigma=self.sigma)
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(width, in_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        # start near the identity map (noise estimate ~ 0) so early training is stable
        nn.init.normal_(self.body[-1].weight, std=1e-3)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, y: Tensor) -> Tensor:
        """Denoise y [B,C,H,W] -> [B,C,H,W]."""
        self.check_input(y)
        return y - self.body(y)


class UNetDenoiser(Denoiser):
    """A DDPM++-style U-Net used as a denoiser at one noise level.

    The noisy image is mapped onto the VP process at the time t where the noise matches:
    model space y_m = 2y - 1 = x_m + 2s n, and x_t = sqrt(ab) y_m has noise std sqrt(1 - ab) when
    ab = 1 / (1 + 4 s^2) (s = sigma/255). Then x_hat = y - s * eps(x_t, t), so a DSM-trained score
    network of the same shape is a denoiser here too. Any spatial size is accepted (reflection
    padding to a multiple of the down-sampling factor). forward(y [B,C,H,W]) -> [B,C,H,W].
    """

    def __init__(self, in_channels: int = 1, sigma: float = 25.0, ch: int = 32,
                 ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__()
        self.in_channels, self.sigma = int(in_channels), _check_sigma(sigma)
        self.config = dict(in_channels=int(in_channels), sigma=self.sigma, ch=int(ch),
                           ch_mult=list(ch_mult), num_res_blocks=int(num_res_blocks),
                           dropout=float(dropout), beta_min=float(beta_min),
                           beta_max=float(beta_max))
        self.factor = 2 ** (len(ch_mult) - 1)
        # attention only in the middle block: other levels stay convolutional for large images
        self.net = UNet(in_channels=in_channels, image_size=self.factor, ch=ch, ch_mult=ch_mult,
                        num_res_blocks=num_res_blocks, attn_resolutions=(), dropout=dropout,
                        beta_min=beta_min, beta_max=beta_max)
        s = self.sigma / 255.0
        self.alpha_bar = 1.0 / (1.0 + 4.0 * s * s)
        # solve beta_min t + (beta_max - beta_min) t^2 / 2 = -log(ab) for t in (0, 1]
        a, b, c = 0.5 * (beta_max - beta_min), beta_min, math.log(self.alpha_bar)
        self.t = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        if not 0 < self.t <= 1:
            raise ValueError(f"sigma={sigma} does not map to a VP time in (0, 1]")

    def forward(self, y: Tensor) -> Tensor:
        """Denoise y [B,C,H,W] -> [B,C,H,W]."""
        self.check_input(y)
        h, w = y.shape[-2:]
        ph, pw = (-h) % self.factor, (-w) % self.factor
        yp = F.pad(y, (0, pw, 0, ph), mode="reflect") if (ph or pw) else y
        xt = math.sqrt(self.alpha_bar) * (2.0 * yp - 1.0)
        t = torch.full((y.shape[0],), self.t, device=y.device, dtype=torch.float32)
        eps = self.net(xt, t)[..., :h, :w]
        return y - (self.sigma / 255.0) * eps


register_model("dncnn_tiny", DnCNN, dict(in_channels=1, depth=3, width=8), kind="denoiser",
               test=True)
register_model("dncnn_small", DnCNN, dict(in_channels=1, depth=8, width=32), kind="denoiser")
# The standard grey-scale DnCNN-S size: 17 layers of 64 channels.
register_model("dncnn", DnCNN, dict(in_channels=1, depth=17, width=64), kind="denoiser")
register_model("unet_denoiser_tiny", UNetDenoiser, dict(in_channels=1, ch=8, ch_mult=(1, 2)),
               kind="denoiser", test=True)
register_model("unet_denoiser", UNetDenoiser, dict(in_channels=1, ch=32, ch_mult=(1, 2, 2)),
               kind="denoiser")
