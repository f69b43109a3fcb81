"""Transfer and BPDA attacks: the same iterative attack run against another view of the model.

`Transfer` crafts the perturbation on a source model (e.g. the bare classifier) and the result is
applied to the defended model. BPDA is not a separate algorithm: it is PGD (+EOT) run against the
defense's BPDA view (purifier backward = identity); see `ssni.evaluate` for how views are picked.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import ATTACKS, Attack
from .pgd import PGD


@ATTACKS.register("transfer")
class Transfer(Attack):
    """Run `inner` (default PGD) against `source` instead of the attacked model."""

    # the source (the bare classifier) is deterministic: EOT would average one gradient N times
    own_gradients = ("the transfer attack takes its gradients from its deterministic source model, so EOT "
                     "would repeat one gradient; use eot: 1")

    def __init__(self, source: nn.Module | None = None, eps: float = 8 / 255, norm: str = "linf",
                 steps: int = 200, step_size: float = 0.007, loss: str = "ce"):
        super().__init__(eps, norm, loss)
        self.source = source
        self.inner = PGD(eps=eps, norm=norm, steps=steps, step_size=step_size, loss=loss)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """Ignores `model`: the perturbation comes from `self.source`."""
        if self.source is None:
            raise ValueError("transfer attack needs a source model (e.g. the bare classifier)")
        self.inner.targeted = self.targeted
        return self.inner.run(self.source, x, y, generator)

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.describe()}
