"""Attacks on denoisers: denoising-PGD and a random baseline of the same norm.

Setting: a clean image x, its noisy observation y = x + noise, and a denoiser f. The attacker
adds delta to y (not clipped to [0, 1]: noisy observations are not) and maximises the
denoising error ||f(y + delta) - x||^2 with ||delta||_inf <= eps or ||delta||_2 <= eps. With
`zero_mean`, delta is projected each step onto zero mean per sample and channel (the constraint
of observation-based attacks: the perturbation looks like zero-mean noise). All attacks return
delta [B,C,H,W]; budgets are raw norms in pixel units ([0, 1] scale).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import Registry
from .geometry import check_norm, delta_norm, project_delta, random_in_ball, random_on_sphere, steepest_step

__all__ = ["DENOISER_ATTACKS", "DenoisePGD", "RandomPerturbation", "denoising_error",
           "delta_norm", "project_delta", "random_on_sphere"]

DENOISER_ATTACKS = Registry("denoiser attack")


def denoising_error(denoiser: nn.Module, x: Tensor, y_adv: Tensor) -> Tensor:
    """Per-sample squared error ||f(y_adv) - x||^2; x, y_adv: [B,C,H,W] -> [B]."""
    return (denoiser(y_adv).float() - x.float()).pow(2).flatten(1).sum(1)


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
        self.eps, self.norm, self.steps = float(eps), check_norm(norm), int(steps)
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
            delta = random_in_ball(y.shape, self.eps, self.norm, generator, y.device)
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
            delta = project_delta(delta + self.step_size * steepest_step(g, self.norm), self.eps,
                                  self.norm, self.zero_mean)
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
        self.eps, self.norm, self.zero_mean = float(eps), check_norm(norm), bool(zero_mean)

    def __call__(self, denoiser: nn.Module, x: Tensor, y: Tensor,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Random delta [B,C,H,W] with norm eps."""
        return random_on_sphere(tuple(y.shape), self.eps, self.norm, generator, y.device,
                                self.zero_mean)
