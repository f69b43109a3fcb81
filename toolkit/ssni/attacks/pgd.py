"""Projected gradient descent (Linf and L2), the baseline attack."""
from __future__ import annotations

from torch import Tensor, nn

from .base import ATTACKS, Attack
from .geometry import project, random_start, steepest_step


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD with optional random start (Madry et al.); returns the last iterate."""

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", steps: int = 200,
                 step_size: float = 0.007, loss: str = "ce", random_start: bool = True):
        super().__init__(eps, norm, loss)
        self.steps, self.step_size, self.random_start = int(steps), float(step_size), random_start

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """steps x (gradient oracle, ascent step, projection); x [B,C,H,W] -> the last iterate."""
        x_adv = random_start(x, self.eps, self.norm, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            _, grad, _ = self.grad_fn(model, x_adv, y, self.loss)
            x_adv = project(x_adv + self.step_size * steepest_step(grad, self.norm), x,
                            self.eps, self.norm)
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size}
