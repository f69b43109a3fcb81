"""Projected gradient descent (Linf and L2), the baseline attack, and its low-frequency variant."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ATTACKS, Attack, check_steps, resolve_step_size
from .geometry import project, project_delta, random_in_ball, random_start, steepest_step


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD with optional random start (Madry et al.); returns the last iterate.

    `alpha` is accepted everywhere as an alias of `step_size` (torchattacks' name); the defaults
    stay ours (200 steps of 0.007), not torchattacks' (10 steps of 2/255).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))   # any [0, 1] -> logits module
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> from ssni import PGD
        >>> x_adv = PGD(eps=8 / 255, steps=5, step_size=2 / 255)(clf, x, y, seed=0)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6), bool(((x_adv >= 0) & (x_adv <= 1)).all())
        (True, True)
        >>> x_tv = PGD(clf, eps=8 / 255, alpha=2 / 255, steps=5, seed=0)(x, y)   # torchattacks' convention
        >>> torch.equal(x_tv, x_adv)
        True
    """

    def __init__(self, model: Optional[nn.Module] = None, eps: float = 8 / 255, norm: str = "linf",
                 steps: int = 200, step_size: Optional[float] = None, loss: str = "ce",
                 random_start: bool = True, targeted: bool = False, alpha: Optional[float] = None,
                 seed: Optional[int] = None):
        super().__init__(eps, norm, loss, model=model, targeted=targeted, seed=seed)
        self.steps, self.random_start = check_steps(steps), random_start
        self.step_size = resolve_step_size(step_size, alpha, 0.007)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """steps x (gradient oracle, ascent step, projection); x [B,C,H,W] -> the last iterate."""
        return self.ascend(model, x, y, self.start(x, generator), self.steps, self.loss)

    def start(self, x: Tensor, generator) -> Tensor:
        """The first iterate: a random point of the eps-ball (random_start) or x itself; [B,...] -> [B,...]."""
        return random_start(x, self.eps, self.norm, generator) if self.random_start else x.clone()

    def ascend(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, steps: int, loss) -> Tensor:
        """`steps` ascent steps on `loss` from x_adv, each projected into the eps-ball of x; -> the last iterate."""
        for _ in range(steps):
            _, grad, _ = self.grad_fn(model, x_adv, y, loss)
            x_adv = project(x_adv + self.step_size * steepest_step(grad, self.norm), x,
                            self.eps, self.norm)
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size}


def low_size(h: int, w: int, factor: int) -> tuple:
    """Side lengths of the low-resolution perturbation for an [H, W] image (at least 1x1)."""
    return max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor))


def upsample(low: Tensor, size) -> Tensor:
    """Bilinear upsampling [B,C,h,w] -> [B,C,H,W]; a convex combination, so it never grows |values|."""
    return F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)


@ATTACKS.register("lowfreq")
class LowFreqPGD(PGD):
    """PGD in a low-frequency subspace: delta = bilinear upsampling of a delta of size H/factor.

    The iterate is the low-resolution delta; the gradient reaches it through the upsampling's
    adjoint. Linf: the low delta is clipped to eps, and upsampling (convex weights) keeps the full
    delta in the ball. L2: the low delta is rescaled so the upsampled delta has norm <= eps. The
    final [0,1] clip may touch pixels at the box edge (the only departure from the subspace).
    Needs [B,C,H,W] images.
    """

    def __init__(self, model: Optional[nn.Module] = None, eps: float = 8 / 255, norm: str = "linf",
                 steps: int = 200, step_size: Optional[float] = None, loss: str = "ce",
                 random_start: bool = True, targeted: bool = False, alpha: Optional[float] = None,
                 seed: Optional[int] = None, factor: int = 4):
        super().__init__(model, eps, norm, steps, step_size, loss, random_start, targeted, alpha, seed)
        if int(factor) < 1:
            raise ValueError(f"lowfreq factor must be >= 1, got {factor}")
        self.factor = int(factor)

    def _fit(self, low: Tensor, size) -> Tensor:
        """Project the low delta [B,C,h,w] so that upsample(low) lies in the eps-ball."""
        if self.norm == "linf":
            return project_delta(low, self.eps, "linf")
        n = upsample(low, size).flatten(1).norm(dim=1).clamp_min(1e-12)
        return low * (self.eps / n).clamp(max=1.0).view(-1, *([1] * (low.dim() - 1)))

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """PGD on the low-resolution delta; x [B,C,H,W] -> x + upsample(delta_low), clipped to [0,1]."""
        if x.dim() != 4:
            raise ValueError(f"the low-frequency attack needs images [B,C,H,W], got {list(x.shape)}")
        size = x.shape[-2:]
        shape = (x.shape[0], x.shape[1], *low_size(*size, self.factor))
        low = torch.zeros(shape, device=x.device, dtype=x.dtype)
        if self.random_start:
            low = self._fit(random_in_ball(shape, self.eps, self.norm, generator, x.device).to(x.dtype), size)
        loss = self.loss
        for _ in range(self.steps):
            x_adv = (x + upsample(low, size)).clamp(0.0, 1.0)
            _, grad, _ = self.grad_fn(model, x_adv, y, loss)
            with torch.enable_grad():  # the adjoint of the (linear) upsampling
                probe = low.detach().requires_grad_(True)
                (g_low,) = torch.autograd.grad(upsample(probe, size), probe, grad_outputs=grad)
            low = self._fit(low + self.step_size * steepest_step(g_low, self.norm), size)
        return (x + upsample(low, size)).clamp(0.0, 1.0)

    def describe(self) -> dict:
        return {**super().describe(), "factor": self.factor}
