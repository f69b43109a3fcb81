"""Perturbation geometry shared by every attack: Linf / L2 balls, projections, random starts,
steepest-ascent steps, and the zero-mean constraint of observation-based denoiser attacks.

All functions take per-sample batches [B, ...]; budgets `eps` are raw norms in pixel units.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    """The norm's name, or a clear error listing the valid ones."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    return norm


def _view(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcasting against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def zero_mean_box(v: Tensor, eps: float, iters: int = 50) -> Tensor:
    """Exact projection of v [B,C,H,W] onto {|d| <= eps, mean of d over H,W = 0} per (b, c).

    The projection is clip(v - lam, -eps, eps) with lam chosen so the mean is zero; that mean
    is monotone in lam, so bisection finds it.
    """
    flat = v.flatten(2).double()
    lo = flat.amin(2, keepdim=True) - eps
    hi = flat.amax(2, keepdim=True) + eps
    for _ in range(iters):
        lam = 0.5 * (lo + hi)
        m = (flat - lam).clamp(-eps, eps).mean(2, keepdim=True)
        lo = torch.where(m > 0, lam, lo)
        hi = torch.where(m > 0, hi, lam)
    out = (flat - 0.5 * (lo + hi)).clamp(-eps, eps)
    out = out - out.mean(2, keepdim=True)  # remove the bisection's last ~1e-15 residue
    return out.clamp(-eps, eps).to(v.dtype).view_as(v)


def project_delta(delta: Tensor, eps: float, norm: str, zero_mean: bool = False) -> Tensor:
    """Project delta [B,...] onto the eps-ball (Linf or L2); with zero_mean ([B,C,H,W] only),
    intersected with zero mean per sample and channel (an exact projection in both norms)."""
    check_norm(norm)
    if zero_mean and delta.dim() != 4:
        raise ValueError(f"zero-mean projection needs delta [B,C,H,W], got {list(delta.shape)}")
    if norm == "linf":
        return zero_mean_box(delta, eps) if zero_mean else delta.clamp(-eps, eps)
    if zero_mean:  # the ball is centred inside the zero-mean subspace: project there first
        delta = delta - delta.mean((2, 3), keepdim=True)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * _view((eps / n).clamp(max=1.0), delta)


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project x_adv onto the eps-ball around x (Linf or L2), then onto [0,1]."""
    return (x + project_delta(x_adv - x, eps, norm)).clamp(0.0, 1.0)


def random_in_ball(shape: Sequence[int], eps: float, norm: str,
                   generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """A uniformly random point of the Linf or L2 eps-ball per sample; returns [B, ...]."""
    shape = tuple(shape)
    if check_norm(norm) == "linf":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * eps
    d = torch.randn(shape, generator=generator, device=device)
    d = d / _view(d.flatten(1).norm(dim=1).clamp_min(1e-12), d)
    r = torch.rand(shape[0], generator=generator, device=device) ** (1.0 / math.prod(shape[1:]))
    return d * _view(eps * r, d)


def random_start(x: Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """x plus a uniformly random point of its eps-ball, clipped to [0,1]; x [B,...] -> [B,...]."""
    return project(x + random_in_ball(x.shape, eps, norm, generator, x.device), x, eps, norm)


def steepest_step(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction per sample: sign (Linf) or the unit-L2 gradient."""
    if check_norm(norm) == "linf":
        return grad.sign()
    return grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)


def random_on_sphere(shape: Sequence[int], radius: Tensor | float, norm: str,
                     generator: Optional[torch.Generator] = None, device=None,
                     zero_mean: bool = False) -> Tensor:
    """Random perturbation [B,...] whose Linf or L2 norm equals `radius` (a number or [B]).

    Linf: random signs times the radius (the most energetic point of the Linf sphere). L2: a
    uniform direction scaled to the radius. With zero_mean the draw is projected to zero mean
    first, then rescaled to the radius.
    """
    shape = tuple(shape)
    check_norm(norm)
    r = torch.as_tensor(radius, dtype=torch.float32, device=device)
    r = r.expand(shape[0]) if r.dim() == 0 else r
    if norm == "linf":
        d = torch.randn(shape, generator=generator, device=device).sign()
        if zero_mean:
            d = zero_mean_box(d, 1.0)
        return d / _view(d.flatten(1).abs().amax(1).clamp_min(1e-12), d) * _view(r, d)
    d = torch.randn(shape, generator=generator, device=device)
    if zero_mean:
        d = d - d.mean((2, 3), keepdim=True)
    return d / _view(d.flatten(1).norm(dim=1).clamp_min(1e-12), d) * _view(r, d)


def delta_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample Linf or L2 norm of delta [B,...] -> [B]."""
    check_norm(norm)
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
