"""What an attack differentiates: views of a RobustClassifier as plain nn.Modules.

- `full`: gradients through every purification step (attack purifier); t*(x) recomputed at
  every call without gradients (what the SSNI authors' adaptive attack does);
- `adaptive`: also through the score norm and the smooth reweight, so the attacker can push a
  sample towards a low t* (our stronger SSNI-adaptive attack);
- `bpda`: identity in place of the purifier's backward pass, t* without gradients;
- `bare`: the classifier alone with the wrapper's preprocessing (transfer source, "none").
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor, nn

from ..defense import mix_seeds
from ..registry import Registry

VIEWS = Registry("attack view")


class BareView(nn.Module):
    """The wrapped classifier without purification; x [B,C,H,W] in [0,1] -> logits."""

    def __init__(self, defense: nn.Module):
        super().__init__()
        self.defense = defense

    def forward(self, x: Tensor) -> Tensor:
        return self.defense.classify(x)


class DetachedTView(nn.Module):
    """Purify with t*(x) computed without gradients, then classify; gradient mode per view."""

    def __init__(self, defense: nn.Module, grad: str):
        super().__init__()
        self.defense, self.grad = defense, grad

    def forward(self, x: Tensor) -> Tensor:
        seeds = self.defense._seeds(x, None)
        with torch.no_grad():
            t, _ = self.defense.t_star(x.detach(), seeds)
        xp = self.defense.attack_purifier(x, t, seeds=mix_seeds(seeds, 1), grad=self.grad)
        return self.defense.classify(xp)


VIEWS.add("bare", BareView)
VIEWS.add("full", lambda d: DetachedTView(d, "full"))
VIEWS.add("bpda", lambda d: DetachedTView(d, "bpda"))
VIEWS.add("adaptive", lambda d: d.surrogate(grad="full", smooth=True))


def make_view(name: str, defense: nn.Module | None, bare: nn.Module) -> nn.Module:
    """The module an attack differentiates; an undefended model only has the bare view."""
    if defense is None:
        return bare
    return VIEWS.get(name)(defense)
