"""Denoisers at a fixed noise level: photo data, patch training (Gaussian or TS noise), metrics,
attacks, evaluation with a transfer matrix, and figures.

Importing this package registers the `photos` and `photofolder` data sets.
"""
from . import data  # noqa: F401  (registers photos / photofolder into ssni.data.DATASETS)
from .metrics import mse, psnr, ssim
from .patches import RandomPatches

__all__ = ["mse", "psnr", "ssim", "RandomPatches"]
