"""Denoisers at a fixed noise level: patch training (Gaussian or TS noise), metrics, evaluation
with a transfer matrix, and figures. The photo data sets live in ssni.data."""
from . import evaluate, figures, train  # noqa: F401  (the package's public modules)
from .metrics import mse, psnr, ssim
from .patches import RandomPatches

__all__ = ["mse", "psnr", "ssim", "RandomPatches"]
