"""Expectation over transformation: a wrapper around any attack that averages gradients over
batched copies of the input (one large call per chunk, not a loop of calls)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .base import Attack, plain_gradient


class EOTGradient:
    """Gradient oracle averaging loss gradients over `samples` randomized forward passes.

    The input [B,...] is repeated into [samples*B,...] (chunked to `max_batch` rows), so every
    copy draws its own defense randomness inside one batched call.
    """

    def __init__(self, samples: int, max_batch: int = 4096, base: Callable = plain_gradient):
        if samples < 1:
            raise ValueError(f"EOT samples must be >= 1, got {samples}")
        self.samples, self.max_batch, self.base = samples, max_batch, base

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
        b = x.shape[0]
        copies_per_call = max(1, min(self.samples, self.max_batch // max(b, 1)))
        loss_sum = torch.zeros(b, device=x.device)
        grad_sum = torch.zeros_like(x)
        logit_sum = None
        done = 0
        while done < self.samples:
            k = min(copies_per_call, self.samples - done)
            xs = x.repeat(k, *([1] * (x.dim() - 1)))
            ys = y.repeat(k)
            lk, g, z = self.base(model, xs, ys, loss)
            loss_sum += lk.view(k, b).sum(0)
            grad_sum += g.view(k, *x.shape).sum(0)
            zk = torch.softmax(z.float(), dim=1).view(k, b, -1).sum(0)
            logit_sum = zk if logit_sum is None else logit_sum + zk
            done += k
        # logits of the mean probability (for success bookkeeping)
        probs = logit_sum / self.samples
        return loss_sum / self.samples, grad_sum / self.samples, probs.clamp_min(1e-12).log()


def EOT(attack: Attack, samples: int = 20, max_batch: int = 4096) -> Attack:
    """Make `attack` average its gradients over `samples` batched copies (returns it)."""
    attack.grad_fn = EOTGradient(samples, max_batch, base=attack.grad_fn)
    attack.eot_samples = samples
    return attack
