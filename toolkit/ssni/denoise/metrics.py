"""Image quality metrics per sample: PSNR and SSIM (differentiable torch versions).

SSIM follows scikit-image's `structural_similarity` defaults: a 7x7 uniform window, K1 = 0.01,
K2 = 0.03, sample covariances (N/(N-1)), the mean over positions whose window fits inside the
image, and the mean over channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: images must have the same shape, got {list(x.shape)} and "
                         f"{list(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{what}: expected [B,C,H,W] images, got {list(x.shape)}")


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample mean squared error; x, y: [B,C,H,W] -> [B]."""
    _check_pair(x, y, "mse")
    return (x.double() - y.double()).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-sample PSNR in dB, 10 log10(R^2 / MSE); x, y: [B,C,H,W] -> [B] (inf if identical)."""
    err = mse(x, y)
    return (10.0 * torch.log10(data_range ** 2 / err)).float()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-sample mean SSIM; x, y: [B,C,H,W] with H, W >= win_size -> [B]."""
    _check_pair(x, y, "ssim")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be odd and >= 3, got {win_size}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images of size {list(x.shape[-2:])} are smaller than the "
                         f"{win_size}x{win_size} window")
    x, y = x.double(), y.double()
    def box(t: Tensor) -> Tensor:
        """Window means [B,C,H-w+1,W-w+1]: a valid (unpadded) box filter is skimage's uniform
        filter with its (win_size - 1) / 2 border cropped, which SSIM discards anyway."""
        return F.avg_pool2d(t, win_size, stride=1)

    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    ux, uy = box(x), box(y)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
