"""How gradients flow through purification, chosen per call: `full`, `bpda`, `surrogate`.

Each mode is a function (purifier, x [B,C,H,W] in [0,1], t [B], seeds) -> [B,C,H,W] in [0,1].
The forward value is always the purifier's own output; only the backward pass differs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..registry import Registry

GRAD_MODES = Registry("gradient mode")


@GRAD_MODES.register("full")
def full_gradient(purifier, x: Tensor, t: Tensor, seeds: Sequence[int]) -> Tensor:
    """Autograd through every reverse step (each step checkpointed if the purifier says so)."""
    return purifier.run(x, t, seeds)


@GRAD_MODES.register("bpda")
def bpda_gradient(purifier, x: Tensor, t: Tensor, seeds: Sequence[int]) -> Tensor:
    """Purified value, identity Jacobian (BPDA): backward passes the upstream gradient to x."""
    with torch.no_grad():  # asked for: this mode's backward never looks inside the purifier
        out = purifier.run(x, t, seeds)
    return out + (x - x.detach())  # adds exactly 0 to the value; gradient 1 w.r.t. x


@GRAD_MODES.register("surrogate")
def surrogate_gradient(purifier, x: Tensor, t: Tensor, seeds: Sequence[int]) -> Tensor:
    """Value from the purifier's own (defense) settings, gradient from `purifier.surrogate`
    (e.g. fewer steps), run with the same seeds and t*."""
    sur = purifier.surrogate
    if sur is None:
        raise ValueError("grad='surrogate' needs a surrogate purifier: pass surrogate=Purifier(...) "
                         "or set PurifierConfig.surrogate (e.g. {'steps': 20})")
    with torch.no_grad():  # asked for: the defense pass only provides the value
        out = purifier.run(x, t, seeds)
    if not torch.is_grad_enabled():  # the caller records no graph: the surrogate adds nothing
        return out
    nfe, calls = purifier.nfe_last, purifier.calls_last
    approx = sur.run(x, t, seeds)
    purifier.nfe_last, purifier.calls_last = nfe + sur.nfe_last, calls + sur.calls_last
    return out + (approx - approx.detach())
