"""Attacks on denoisers: denoising-PGD and a random baseline of the same norm.

Setting: a clean image x, its noisy observation y = x + noise, and a denoiser f. The attacker
adds delta to y (not clipped to [0, 1]: noisy observations are not) and maximises the
denoising error ||f(y + delta) - x||^2 with ||delta||_inf <= eps or ||delta||_2 <= eps. With
`zero_mean`, delta is projected each step onto zero mean per sample and channel (the constraint
of observation-based attacks: the perturbation looks like zero-mean noise). All attacks return
delta [B,C,H,W]; budgets are raw norms in pixel units ([0, 1] scale).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import Registry

DENOISER_ATTACKS = Registry("denoiser attack")
NORMS = ("linf", "l2")


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    return norm


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _zero_mean_box(v: Tensor, eps: float, iters: int = 50) -> Tensor:
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
    """Project delta [B,C,H,W] onto the eps-ball (Linf or L2), optionally intersected with
    zero mean per sample and channel (an exact projection in both norms)."""
    _check_norm(norm)
    if delta.dim() != 4:
        raise ValueError(f"delta must be [B,C,H,W], got {list(delta.shape)}")
    if norm == "linf":
        return _zero_mean_box(delta, eps) if zero_mean else delta.clamp(-eps, eps)
    if zero_mean:  # the ball is centred inside the zero-mean subspace: project there first
        delta = delta - delta.mean((2, 3), keepdim=True)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * _view((eps / n).clamp(max=1.0), delta)


def denoising_error(denoiser: nn.Module, x: Tensor, y_adv: Tensor) -> Tensor:
    """Per-sample squared error ||f(y_adv) - x||^2; x, y_adv: [B,C,H,W] -> [B]."""
    return (denoiser(y_adv).float() - x.float()).pow(2).flatten(1).sum(1)


def _random_in_ball(shape: Tuple[int, ...], eps: float, norm: str,
                    generator: Optional[torch.Generator], device) -> Tensor:
    if norm == "linf":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * eps
    d = torch.randn(shape, generator=generator, device=device)
    d = d / _view(d.flatten(1).norm(dim=1).clamp_min(1e-12), d)
    r = torch.rand(shape[0], generator=generator, device=device) ** (1.0 / math.prod(shape[1:]))
    return d * _view(eps * r, d)


def random_on_sphere(shape: Tuple[int, ...], radius: Tensor | float, norm: str,
                     generator: Optional[torch.Generator] = None, device=None,
                     zero_mean: bool = False) -> Tensor:
    """Random perturbation [B,...] whose Linf or L2 norm equals `radius` (a number or [B]).

    Linf: random signs times the radius (the most energetic point of the Linf sphere). L2: a
    uniform direction scaled to the radius. With zero_mean the draw is projected to zero mean
    first, then rescaled to the radius.
    """
    _check_norm(norm)
    r = torch.as_tensor(radius, dtype=torch.float32, device=device)
    r = r.expand(shape[0]) if r.dim() == 0 else r
    if norm == "linf":
        d = torch.randn(shape, generator=generator, device=device).sign()
        if zero_mean:
            d = _zero_mean_box(d, 1.0)
        return d / _view(d.flatten(1).abs().amax(1).clamp_min(1e-12), d) * _view(r, d)
    d = torch.randn(shape, generator=generator, device=device)
    if zero_mean:
        d = d - d.mean((2, 3), keepdim=True)
    return d / _view(d.flatten(1).norm(dim=1).clamp_min(1e-12), d) * _view(r, d)


def delta_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample Linf or L2 norm of delta [B,...] -> [B]."""
    _check_norm(norm)
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


@DENOISER_ATTACKS.register("pgd")
class DenoisePGD:
    """Denoising-PGD: maximise ||f(y + delta) - x||^2 under an Linf or L2 budget.

    Signed (Linf) or normalised (L2) gradient steps of size `step_size` (default 2.5 eps /
    steps), a uniformly random start in the ball (if `random_start`), and the best delta seen per
    sample is returned. Call: (denoiser, x [B,C,H,W], y [B,C,H,W], generator) -> delta.
    """

    def __init__(self, eps: float, norm: str = "linf", steps: int = 10,
                 step_size: Optional[float] = None, zero_mean: bool = False,
                 random_start: bool = True):
        if not eps > 0:
            raise ValueError(f"attack budget eps must be > 0, got {eps!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.eps, self.norm, self.steps = float(eps), _check_norm(norm), int(steps)
        self.step_size = float(step_size) if step_size else 2.5 * self.eps / self.steps
        self.zero_mean, self.random_start = bool(zero_mean), bool(random_start)

    def _grad(self, denoiser: nn.Module, x: Tensor, y: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = denoising_error(denoiser, x, y + delta)
            (g,) = torch.autograd.grad(loss.sum(), delta)
        return loss.detach(), g.detach()

    def __call__(self, denoiser: nn.Module, x: Tensor, y: Tensor,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Adversarial delta [B,C,H,W] for clean x and noisy y (both [B,C,H,W])."""
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"x and y must both be [B,C,H,W] of one shape, got {list(x.shape)} "
                             f"and {list(y.shape)}")
        x, y = x.detach(), y.detach()
        if self.random_start:
            delta = _random_in_ball(tuple(y.shape), self.eps, self.norm, generator, y.device)
        else:
            delta = torch.zeros_like(y)
        delta = project_delta(delta, self.eps, self.norm, self.zero_mean)
        best, best_loss = delta.clone(), torch.full((y.shape[0],), -1.0, device=y.device)
        for _ in range(self.steps):
            loss, g = self._grad(denoiser, x, y, delta)
            better = loss > best_loss
            best[better], best_loss[better] = delta[better], loss[better]
            if self.zero_mean:  # step inside the zero-mean subspace: a DC gradient is useless
                g = g - g.mean((2, 3), keepdim=True)
            if self.norm == "linf":
                step = g.sign()
            else:
                step = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), g)
            delta = project_delta(delta + self.step_size * step, self.eps, self.norm, self.zero_mean)
        with torch.no_grad():
            loss = denoising_error(denoiser, x, y + delta)
        better = loss > best_loss
        best[better] = delta[better]
        return best


@DENOISER_ATTACKS.register("random")
class RandomPerturbation:
    """Baseline: a random delta on the budget's sphere (same norm as the attack's budget).

    Call: (denoiser, x, y, generator) -> delta [B,C,H,W]; the denoiser is not used.
    """

    def __init__(self, eps: float, norm: str = "linf", zero_mean: bool = False):
        if not eps > 0:
            raise ValueError(f"budget eps must be > 0, got {eps!r}")
        self.eps, self.norm, self.zero_mean = float(eps), _check_norm(norm), bool(zero_mean)

    def __call__(self, denoiser: nn.Module, x: Tensor, y: Tensor,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Random delta [B,C,H,W] with norm eps."""
        return random_on_sphere(tuple(y.shape), self.eps, self.norm, generator, y.device,
                                self.zero_mean)
