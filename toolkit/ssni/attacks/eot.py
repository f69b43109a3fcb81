"""Expectation over transformation: a wrapper around any attack that averages gradients over
batched copies of the input (one large call per chunk, not a loop of calls). The selective
variant (DiffHammer's idea) averages only over the draws that still resist the attack."""
from __future__ import annotations

import copy
from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .base import Attack, plain_gradient


def still_resists(logits: Tensor, y: Tensor, loss: Callable) -> Tensor:
    """Which draws the attack has not yet won; logits [R,K], y [R] -> bool [R].

    Untargeted: the draw still predicts y. Targeted (the loss says so): it does not predict the target y.
    """
    hit = logits.argmax(1) == y
    return ~hit if getattr(loss, "targeted", False) else hit


class EOTGradient:
    """Gradient oracle averaging loss gradients over `samples` randomized forward passes.

    The input [B,...] is repeated into [samples*B,...] (chunked to `max_batch` rows), so every
    copy draws its own defense randomness inside one batched call. With `selective`, the gradient
    of each sample is the mean over its draws that still resist (`still_resists`), or over all
    draws when none does; the returned loss stays the mean over all draws (the EOT objective that
    APGD's best-point bookkeeping compares).
    """

    def __init__(self, samples: int, max_batch: int = 4096, base: Callable = plain_gradient,
                 selective: bool = False):
        if samples < 1:
            raise ValueError(f"EOT samples must be >= 1, got {samples}")
        self.samples, self.max_batch, self.base = samples, max_batch, base
        self.selective = bool(selective)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
        """(mean loss [B], averaged gradient [B,...], log of the mean probabilities [B,K])."""
        b = x.shape[0]
        copies_per_call = max(1, min(self.samples, self.max_batch // max(b, 1)))
        loss_sum = torch.zeros(b, device=x.device)
        grad_sum = torch.zeros_like(x)
        # selective sums stream with the chunks, so no [samples, B, ...] gradient is ever held
        kept_grad = torch.zeros_like(x) if self.selective else None
        kept = torch.zeros(b, device=x.device)
        logit_sum = None
        done = 0
        while done < self.samples:
            k = min(copies_per_call, self.samples - done)
            xs = x.repeat(k, *([1] * (x.dim() - 1)))
            ys = y.repeat(k)
            lk, g, z = self.base(model, xs, ys, loss)
            loss_sum += lk.view(k, b).sum(0)
            g = g.view(k, *x.shape)
            grad_sum += g.sum(0)
            if kept_grad is not None:
                w = still_resists(z, ys, loss).view(k, b).to(g.dtype)
                kept_grad += (w.view(k, b, *([1] * (x.dim() - 1))) * g).sum(0)
                kept += w.sum(0)
            zk = torch.softmax(z.float(), dim=1).view(k, b, -1).sum(0)
            logit_sum = zk if logit_sum is None else logit_sum + zk
            done += k
        grad = grad_sum / self.samples
        if kept_grad is not None:
            some = kept > 0
            sel = kept_grad / kept.clamp_min(1).view(-1, *([1] * (x.dim() - 1)))
            grad = torch.where(some.view(-1, *([1] * (x.dim() - 1))), sel, grad)
        # logits of the mean probability (for success bookkeeping)
        probs = logit_sum / self.samples
        return loss_sum / self.samples, grad, probs.clamp_min(1e-12).log()


class SelectiveEOTGradient(EOTGradient):
    """EOTGradient with `selective=True`: average only over the draws that still resist."""

    def __init__(self, samples: int, max_batch: int = 4096, base: Callable = plain_gradient):
        super().__init__(samples, max_batch, base, selective=True)


def EOT(attack: Attack, samples: int = 20, max_batch: int = 4096, selective: bool = False) -> Attack:
    """A new attack: `attack` with its gradients averaged over `samples` batched copies (selective:
    DiffHammer-style). The attack given is left unchanged; wrapping an EOT attack again nests the oracles."""
    wrapped = copy.copy(attack)  # shallow: same settings and bound model, its own gradient oracle
    wrapped.grad_fn = EOTGradient(samples, max_batch, base=attack.grad_fn, selective=selective)
    wrapped.eot_samples = samples
    wrapped.eot_selective = bool(selective)
    return wrapped
