"""Attack base class, losses, projections, and the gradient oracle that EOT replaces.

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


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project x_adv onto the eps-ball around x (Linf or L2), then onto [0,1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    else:
        raise ValueError(f"unknown norm {norm!r}; valid choices: linf, l2")
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """A uniformly random point of the eps-ball (Linf) or of the L2 ball, clipped to [0,1]."""
    if norm == "linf":
        d = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        r = torch.rand(x.shape[0], generator=generator, device=x.device) ** (1.0 / x[0].numel())
        d = d * (eps * r).view(-1, *([1] * (x.dim() - 1)))
    return project(x + d, x, eps, norm)


def normalized_step(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction: sign (Linf) or unit-L2 gradient, per sample."""
    if norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / n.view(-1, *([1] * (grad.dim() - 1)))


class Attack:
    """Base class. Subclasses implement `run(model, x, y, generator) -> x_adv`."""

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", loss: str = "ce"):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"unknown norm {norm!r}; valid choices: linf, l2")
        self.eps, self.norm = float(eps), norm
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
