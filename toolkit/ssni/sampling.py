"""Per-sample reverse-diffusion steps on the discrete DDPM grid, and unconditional generation.

A step moves each sample from its own discrete index i to its own earlier index j < i
(j = -1 means "to clean data", alpha_bar = 1). Both DDPM (ancestral) and DDIM (eta = 0) share
the x0 / eps prediction, so samplers on strided per-sample grids are built from these.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .diffusion import VPDiffusion, per_sample, to_pixel_space


def _alpha_bar_at(diffusion: VPDiffusion, i: Tensor) -> Tensor:
    """Discrete alpha_bar at indices i (long [B]); index -1 gives 1.0."""
    ab = diffusion.alpha_bar_discrete(i.clamp(min=0))
    return torch.where(i < 0, torch.ones_like(ab), ab)


def predict_x0(model: nn.Module, x: Tensor, i: Tensor, clip: bool = True):
    """Network eps and the implied x0 at discrete indices i; x: [B,C,H,W], i: long [B]."""
    diffusion: VPDiffusion = model.diffusion
    ab = _alpha_bar_at(diffusion, i)
    eps = model(x, diffusion.t_of_step(i).to(x.dtype))  # t in the caller's precision (float64 tests)
    x0 = (x - per_sample(torch.sqrt(1 - ab), x) * eps) / per_sample(torch.sqrt(ab), x)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return eps, x0


def ddpm_mean_var(model: nn.Module, x: Tensor, i: Tensor, j: Tensor, clip: bool = True):
    """Mean [B,C,H,W] and variance [B] of the ancestral step x_i -> x_j (j < i, per sample)."""
    diffusion: VPDiffusion = model.diffusion
    ab_i, ab_j = _alpha_bar_at(diffusion, i), _alpha_bar_at(diffusion, j)
    _, x0 = predict_x0(model, x, i, clip)
    beta = 1.0 - ab_i / ab_j  # effective beta of the (strided) step
    c0 = torch.sqrt(ab_j) * beta / (1.0 - ab_i)
    ct = torch.sqrt(1.0 - beta) * (1.0 - ab_j) / (1.0 - ab_i)
    mean = per_sample(c0, x) * x0 + per_sample(ct, x) * x
    var = beta * (1.0 - ab_j) / (1.0 - ab_i)
    return mean, var


def ddpm_step(model: nn.Module, x: Tensor, i: Tensor, j: Tensor, noise: Optional[Tensor],
              clip: bool = True) -> Tensor:
    """Ancestral step x_i -> x_j (j < i, per sample); noise [B,C,H,W] is ignored where j = -1."""
    mean, var = ddpm_mean_var(model, x, i, j, clip)
    if noise is None:
        return mean
    std = torch.where(j < 0, torch.zeros_like(var), torch.sqrt(var.clamp(min=0)))
    return mean + per_sample(std, x) * noise


def ddim_step(model: nn.Module, x: Tensor, i: Tensor, j: Tensor, clip: bool = True) -> Tensor:
    """Deterministic DDIM (eta = 0) step x_i -> x_j per sample."""
    diffusion: VPDiffusion = model.diffusion
    ab_j = _alpha_bar_at(diffusion, j)
    eps, x0 = predict_x0(model, x, i, clip)
    if clip:  # keep eps consistent with the clipped x0
        ab_i = _alpha_bar_at(diffusion, i)
        eps = (x - per_sample(torch.sqrt(ab_i), x) * x0) / per_sample(torch.sqrt(1 - ab_i), x)
    return per_sample(torch.sqrt(ab_j), x) * x0 + per_sample(torch.sqrt(1 - ab_j), x) * eps


@torch.no_grad()
def generate(model: nn.Module, n: int, steps: int = 250, generator: Optional[torch.Generator] = None,
             device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """Unconditional ancestral DDPM samples on a strided grid; returns [n,C,H,W] in [0,1]."""
    from tqdm.auto import tqdm

    diffusion: VPDiffusion = model.diffusion
    c, h, w = model.input_shape
    x = torch.randn((n, c, h, w), generator=generator, device=device)
    grid = torch.unique(torch.linspace(diffusion.N - 1, 0, steps).round().long())
    grid = torch.flip(grid, [0]).tolist() + [-1]
    for a, b in tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc="sampling"):
        i = torch.full((n,), a, device=device, dtype=torch.long)
        j = torch.full((n,), b, device=device, dtype=torch.long)
        z = torch.randn(x.shape, generator=generator, device=device)
        x = ddpm_step(model, x, i, j, z)
    return to_pixel_space(x).clamp(0.0, 1.0)
