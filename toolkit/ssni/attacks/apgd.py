"""APGD (Croce & Hein, 2020): step-size-free PGD with momentum and checkpoint halving, with CE or
DLR loss. With `EOT` it is the randomized version of AutoAttack's first two parts."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..config import bound
from .base import ATTACKS, Attack, check_steps
from .geometry import project, random_start, steepest_step


def apgd_checkpoints(steps: int) -> List[int]:
    """Iterations at which the step size may be halved: p0=0, p1=0.22, p_{j+1}=p_j+max(p_j-p_{j-1}-0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({int(round(q * steps)) for q in p if 0 < q <= 1.0})


@ATTACKS.register("apgd")
class APGD(Attack):
    """APGD-CE / APGD-DLR (loss="ce" | "dlr" | "margin"), Linf or L2; returns the best point found.

    Also callable torchattacks style, `APGD(model, eps=..., steps=..., loss="ce", seed=0)(x, y)`;
    with `targeted=True`, y holds the targets and the best point is the one closest to them.
    """

    def __init__(self, model: Optional[nn.Module] = None, eps: float = 8 / 255, norm: str = "linf",
                 steps: int = 100, loss: str = "ce", rho: float = 0.75, momentum: float = 0.75,
                 random_start: bool = True, targeted: bool = False, seed: Optional[int] = None):
        super().__init__(eps, norm, loss, model=model, targeted=targeted, seed=seed)
        bound(gt=0, lt=1).check(rho, "rho")
        bound(ge=0, le=1).check(momentum, "momentum")
        self.steps, self.rho, self.momentum, self.random_start = check_steps(steps), rho, momentum, random_start

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """Adaptive-step iterations over the eps-ball; x [B,C,H,W] -> x_adv."""
        b = x.shape[0]
        shape = (b,) + (1,) * (x.dim() - 1)
        eta = torch.full(shape, 2.0 * self.eps, device=x.device)
        x_k = random_start(x, self.eps, self.norm, generator) if self.random_start else x.clone()
        loss_fn = self.loss
        loss, grad, _ = self.grad_fn(model, x_k, y, loss_fn)
        x_best, loss_best, grad_best = x_k.clone(), loss.clone(), grad.clone()
        x_prev = x_k.clone()
        checkpoints = set(apgd_checkpoints(self.steps))
        last_ckpt, successes = 0, torch.zeros(b, device=x.device)
        loss_best_at_ckpt, eta_at_ckpt = loss_best.clone(), eta.clone()
        for k in range(self.steps):
            z = project(x_k + eta * steepest_step(grad, self.norm), x, self.eps, self.norm)
            a = self.momentum if k > 0 else 1.0
            x_new = project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, self.eps, self.norm)
            x_prev, x_k = x_k, x_new
            loss, grad_new, _ = self.grad_fn(model, x_k, y, loss_fn)
            improved = loss > loss_best
            successes += improved.float()
            x_best[improved], loss_best[improved] = x_k[improved], loss[improved]
            grad_best[improved] = grad_new[improved]
            grad = grad_new
            if (k + 1) in checkpoints:
                span = k + 1 - last_ckpt
                cond1 = successes < self.rho * span
                cond2 = (eta_at_ckpt.flatten() == eta.flatten()) & (loss_best_at_ckpt == loss_best)
                halve = cond1 | cond2
                if halve.any():
                    eta[halve] /= 2.0
                    x_k[halve] = x_best[halve]  # restart from the best point with a smaller step
                    x_prev[halve] = x_best[halve]
                    grad[halve] = grad_best[halve]
                last_ckpt, successes = k + 1, torch.zeros_like(successes)
                loss_best_at_ckpt, eta_at_ckpt = loss_best.clone(), eta.clone()
        return x_best

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.steps}
