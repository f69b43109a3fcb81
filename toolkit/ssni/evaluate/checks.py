"""Self-checks run before numbers are reported (flags, not silent fixes).

The idea follows AutoAttack's checks: gradients that vanish (masking), randomness attacked
without EOT, accuracy that does not fall as epsilon grows, and accuracy that stays high at a
huge epsilon (a sure sign of broken gradients).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..attacks.base import LOSSES


def gradient_check(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce",
                   tiny: float = 1e-10) -> Dict[str, float | str | None]:
    """Flags zero / vanishing / non-finite input gradients of `model` at x; returns stats."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = LOSSES.get(loss)(model(x), y).sum()
        grad = torch.autograd.grad(out, x, allow_unused=True)[0]
    if grad is None:
        return {"flag": "no gradient reaches the input (detached somewhere)", "zero_fraction": 1.0}
    if not torch.isfinite(grad).all():
        return {"flag": "non-finite input gradients", "zero_fraction": float("nan")}
    norms = grad.flatten(1).abs().sum(1)
    zero_frac = (norms <= tiny).float().mean().item()
    flag = None
    if zero_frac >= 0.5:
        flag = f"zero or vanishing input gradients for {zero_frac:.0%} of samples (gradient masking?)"
    return {"flag": flag, "zero_fraction": zero_frac, "mean_l1": norms.mean().item()}


@torch.no_grad()
def randomness_check(model: nn.Module, x: Tensor, eot_samples: int) -> Dict[str, float | str | None]:
    """Flags a model whose outputs change between identical calls while the attack uses no EOT."""
    a, b = model(x), model(x)
    varies = not torch.allclose(a, b)
    flag = None
    if varies and eot_samples <= 1:
        flag = "the defense is randomized but the attack uses no EOT (eot=1)"
    return {"flag": flag, "randomized": varies}


def epsilon_checks(eps: Sequence[float], acc: Sequence[float], chance: float,
                   tol: float = 0.05, huge_eps: float | None = None) -> List[str]:
    """Flags accuracy that rises with epsilon (beyond tol), and high accuracy at a huge epsilon."""
    flags = []
    pairs = sorted(zip(eps, acc))
    for (e0, a0), (e1, a1) in zip(pairs, pairs[1:]):
        if a1 > a0 + tol:
            flags.append(f"accuracy rose from {a0:.3f} at eps={e0:g} to {a1:.3f} at eps={e1:g}")
    if huge_eps is not None:
        for e, a in pairs:
            if e >= huge_eps and a > chance + 0.1:
                flags.append(f"accuracy {a:.3f} at a huge eps={e:g} is far above chance "
                             f"({chance:.2f}): gradients are probably broken")
    return flags
