"""How gradients flow through purification, chosen per call: `full` or `bpda`.

Each mode is a function (purifier, x [B,C,H,W] in [0,1], t [B], seeds, record=None) -> [B,C,H,W]
in [0,1]. The forward value is always the purifier's own output; only the backward pass differs.
`record` (a list) receives the image after every global reverse step (Purifier.trajectory), with
the same backward rule as the output.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..registry import Registry

GRAD_MODES = Registry("gradient mode")


@GRAD_MODES.register("full")
def full_gradient(purifier, x: Tensor, t: Tensor, seeds: Sequence[int],
                  record: Optional[List[Tensor]] = None) -> Tensor:
    """Autograd through every reverse step (each step checkpointed if the purifier says so)."""
    return purifier.run(x, t, seeds, record=record)


@GRAD_MODES.register("bpda")
def bpda_gradient(purifier, x: Tensor, t: Tensor, seeds: Sequence[int],
                  record: Optional[List[Tensor]] = None) -> Tensor:
    """Purified value, identity Jacobian (BPDA): backward passes the upstream gradient to x."""
    states: Optional[List[Tensor]] = [] if record is not None else None
    with torch.no_grad():  # asked for: this mode's backward never looks inside the purifier
        out = purifier.run(x, t, seeds, record=states)
    out = out + (x - x.detach())  # adds exactly 0 to the value; gradient 1 w.r.t. x
    if record is not None:  # every recorded step is an identity-Jacobian copy of x too
        record.extend(s + (x - x.detach()) for s in states[:-1])
        record.append(out)
    return out
