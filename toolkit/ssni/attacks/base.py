"""Attack base class, losses, and the gradient oracle that EOT replaces (geometry: geometry.py).

Every attack maps (model, x [B,C,H,W] in [0,1], y [B]) -> x_adv with ||x_adv - x|| <= eps
(Linf or L2) and x_adv in [0,1]. Gradients come from `self.grad_fn(model, x, y, loss)` so
that `EOT` can wrap any attack by swapping the oracle, without copying the attack.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .geometry import check_norm, project

ATTACKS = Registry("attack")
LOSSES = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy; logits [B,K], y [B] -> [B]."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@LOSSES.register("dlr")
def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference-of-logits-ratio loss (untargeted, scale invariant); [B,K], [B] -> [B]."""
    z = logits.float()
    zs, _ = z.sort(dim=1)
    z_y = z.gather(1, y[:, None])[:, 0]
    top_is_y = (zs[:, -1] == z_y).float()
    other = zs[:, -2] * top_is_y + zs[:, -1] * (1.0 - top_is_y)
    denom = (zs[:, -1] - zs[:, -3]).clamp_min(1e-12) if z.shape[1] >= 3 else torch.ones_like(z_y)
    return -(z_y - other) / denom


@LOSSES.register("margin")
def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW-style margin: max other logit - true logit; [B,K], [B] -> [B]."""
    z = logits.float()
    z_y = z.gather(1, y[:, None])[:, 0]
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y


def plain_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
    """One autograd pass: (per-sample loss [B], grad wrt x [B,...], logits [B,K])."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        per_sample = loss(logits, y)
        (grad,) = torch.autograd.grad(per_sample.sum(), x)
    return per_sample.detach(), grad.detach(), logits.detach()


class Attack:
    """Base class. Subclasses implement `run(model, x, y, generator) -> x_adv`."""

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", loss: str = "ce"):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps, self.norm = float(eps), check_norm(norm)
        self.loss_name = loss
        self.loss = LOSSES.get(loss)
        self.grad_fn: Callable = plain_gradient
        self.eot_samples = 1  # set by the EOT wrapper; reported by the evaluation

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, seed: Optional[int] = None) -> Tensor:
        """Attack a batch; returns x_adv [B,C,H,W] in [0,1] within the eps-ball of x."""
        if x.min() < 0 or x.max() > 1:
            raise ValueError("attack inputs must be images in [0, 1]")
        g = None
        if seed is not None:
            g = torch.Generator(device=x.device).manual_seed(int(seed))
        x_adv = self.run(model, x.detach(), y, g)
        return project(x_adv.detach(), x, self.eps, self.norm)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings for reports."""
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm,
                "loss": self.loss_name, "eot": self.eot_samples}
