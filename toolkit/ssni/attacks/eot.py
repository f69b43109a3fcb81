"""Expectation over transformation: a wrapper around any attack that averages gradients over
batched copies of the input (one large call per chunk, not a loop of calls). The selective
variant (DiffHammer's idea) averages only over the draws that still resist the attack.

Under torch.distributed (`dist=`: any object with rank, world_size and all_reduce(tensor), such as
ssni.dist.DistContext) the copies of one batch are split across ranks, copy j on rank
j % world_size, and their losses, gradients and probabilities are exchanged, so every rank gets the
gradient one process computes and runs the identical attack. For that the defense randomness of a
copy must not depend on the rank computing it: the oracle draws one seed per (copy, sample) up front
from torch's global RNG and passes them as `seeds=` to a model whose forward takes them (every
ssni RobustClassifier view does).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..seeding import derive_seed, draw_seeds
from .base import Attack, plain_gradient


def still_resists(logits: Tensor, y: Tensor, loss: Callable) -> Tensor:
    """Which draws the attack has not yet won; logits [R,K], y [R] -> bool [R].

    Untargeted: the draw still predicts y. Targeted (the loss says so): it does not predict the target y.
    """
    hit = logits.argmax(1) == y
    return ~hit if getattr(loss, "targeted", False) else hit


def takes_seeds(model: Any) -> bool:
    """Whether `model(x, seeds=LongTensor[B])` is accepted (a `seeds` parameter in its forward)."""
    fn = getattr(model, "forward", model)
    try:
        return "seeds" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and C callables have no signature to read
        return False


class _SeededCopies(nn.Module):
    """`model` called with fixed per-row seeds [R]; x [R,...] -> model(x, seeds) (and stepwise likewise).

    A wrapping oracle under this one (nested EOT) may pass its own seeds; they take precedence.
    """

    def __init__(self, model: nn.Module, seeds: Tensor):
        super().__init__()
        self.model, self.seeds = model, seeds
        stepwise = getattr(model, "stepwise", None)
        if callable(stepwise):  # the per-step loss reads it (attacks/perstep.py)
            self.stepwise = lambda x, seeds=None: stepwise(x, seeds=self._rows(x, seeds))
        with_t = getattr(model, "with_t_star", None)
        if callable(with_t):  # a loss on t*(x) reads it (attacks/lownoise.py)
            self.with_t_star = lambda x, seeds=None: with_t(x, seeds=self._rows(x, seeds))

    def _rows(self, x: Tensor, seeds: Optional[Tensor]) -> Tensor:
        if seeds is not None:
            return seeds
        if x.shape[0] != self.seeds.numel():
            raise ValueError(f"EOT: {x.shape[0]} inputs, but {self.seeds.numel()} copy seeds were drawn")
        return self.seeds

    def forward(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Logits [R,K] of the wrapped model with the copies' seeds."""
        return self.model(x, seeds=self._rows(x, seeds))


def _split(dist: Any) -> Tuple[int, int]:
    """(rank, world size) of a distributed context; (0, 1) for None or one process."""
    if dist is None:
        return 0, 1
    world, rank = int(getattr(dist, "world_size", 1)), int(getattr(dist, "rank", 0))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"EOT dist: rank {rank} is not in [0, world_size={world})")
    if world > 1 and not callable(getattr(dist, "all_reduce", None)):
        raise TypeError(f"EOT dist: {type(dist).__name__} has no all_reduce(tensor); pass e.g. a DistContext")
    return rank, world


class EOTGradient:
    """Gradient oracle averaging loss gradients over `samples` randomized forward passes.

    The input [B,...] is repeated into [k*B,...] (k copies per call, at most `max_batch` rows), so every
    copy draws its own defense randomness inside one batched call. A model whose forward takes `seeds`
    gets one seed per (copy, sample), drawn up front from torch's global RNG; other models draw their
    randomness themselves. With `selective`, the gradient of each sample is the mean over its draws
    that still resist (`still_resists`), or over all draws when none does; the returned loss stays the
    mean over all draws (the EOT objective that APGD's best-point bookkeeping compares).

    With `dist` (world_size > 1) each rank computes copies j with j % world_size == rank (up to
    `max_batch` rows per call) and the per-copy results are exchanged round by round (zeros elsewhere,
    so the all-reduced sums are exact) and added in copy order, as in one process: the result equals
    the one-process result up to the last bits a different batch size may change in the model. A model
    without `seeds` then draws under a forked global RNG, so the ranks stay in step, but its copies'
    randomness depends on the split. With world_size 1, `dist` is ignored.
    """

    def __init__(self, samples: int, max_batch: int = 4096, base: Callable = plain_gradient,
                 selective: bool = False, dist: Any = None):
        if samples < 1:
            raise ValueError(f"EOT samples must be >= 1, got {samples}")
        if max_batch < 1:
            raise ValueError(f"EOT max_batch must be >= 1 (rows per call), got {max_batch}")
        _split(dist)  # fail early on a context that cannot work
        self.samples, self.max_batch, self.base = samples, max_batch, base
        self.selective = bool(selective)
        self.dist = dist

    def _copies(self, model: nn.Module, x: Tensor, y: Tensor, loss: Callable, js: List[int],
                seeds: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Copies `js` of x in one call: losses [n,B], gradients [n,B,...], probabilities [n,B,K], resist [n,B]."""
        n, b = len(js), x.shape[0]
        xs = x.repeat(n, *([1] * (x.dim() - 1)))
        ys = y.repeat(n)
        if seeds is not None:
            model = _SeededCopies(model, seeds[js].reshape(-1))
        lk, g, z = self.base(model, xs, ys, loss)
        probs = torch.softmax(z.float(), dim=1).view(n, b, -1)
        resist = still_resists(z, ys, loss).view(n, b)
        return lk.view(n, b), g.view(n, *x.shape), probs, resist

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
        """(mean loss [B], averaged gradient [B,...], log of the mean probabilities [B,K])."""
        b, shape1 = x.shape[0], [1] * (x.dim() - 1)
        rank, world = _split(self.dist)
        # one seed per (copy, sample), whatever rank computes the copy: [samples, B]
        seeds = draw_seeds(self.samples * b).view(self.samples, b) if takes_seeds(model) else None
        # a model drawing its own randomness: every rank forks the same global RNG state (drawn here)
        fork = int(draw_seeds(1)) if world > 1 and seeds is None else None
        per_call = max(1, min(self.samples, self.max_batch // max(b, 1)))  # copies per call on one rank
        loss_sum = torch.zeros(b, device=x.device)
        grad_sum = torch.zeros_like(x)
        # selective sums stream with the rounds, so no [samples, B, ...] gradient is ever held
        kept_grad = torch.zeros_like(x) if self.selective else None
        kept = torch.zeros(b, device=x.device)
        prob_sum = None
        classes = None
        for start in range(0, self.samples, per_call * world):
            js = list(range(start, min(start + per_call * world, self.samples)))
            mine = js[rank::world]  # start is a multiple of world: copy j on rank j % world
            if world == 1:
                lk, g, p, r = self._copies(model, x, y, loss, js, seeds)
            else:
                lk, g, p, r, classes = self._exchange(model, x, y, loss, js, mine, seeds, fork, classes)
            # copy by copy, in copy order: the same sums however the copies were split
            for i in range(len(js)):
                loss_sum += lk[i]
                grad_sum += g[i]
                prob_sum = p[i].clone() if prob_sum is None else prob_sum + p[i]
                if kept_grad is not None:
                    w = r[i].to(g.dtype)
                    kept_grad += w.view(b, *shape1) * g[i]
                    kept += w
        grad = grad_sum / self.samples
        if kept_grad is not None:
            some = kept > 0
            sel = kept_grad / kept.clamp_min(1).view(-1, *shape1)
            grad = torch.where(some.view(-1, *shape1), sel, grad)
        # logits of the mean probability (for success bookkeeping)
        probs = prob_sum / self.samples
        return loss_sum / self.samples, grad, probs.clamp_min(1e-12).log()

    def _exchange(self, model, x, y, loss, js, mine, seeds, fork, classes):
        """This rank's copies of one round, then everyone's: (losses [n,B], gradients [n,B,...],
        probabilities [n,B,K], resist [n,B], K), identical on every rank."""
        rank, world = _split(self.dist)
        n, b, start = len(js), x.shape[0], js[0]
        out = None
        if mine:
            if fork is None:
                out = self._copies(model, x, y, loss, mine, seeds)
            else:
                devices = [x.device] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(derive_seed(fork, start, rank))
                    out = self._copies(model, x, y, loss, mine, seeds)
        if classes is None:  # a rank without copies in this round learns K from the others
            k = torch.tensor([0 if out is None else out[2].shape[-1]], device=x.device)
            classes = int(self.dist.all_reduce(k, op="max").item())
        grads = torch.zeros(n, *x.shape, dtype=x.dtype, device=x.device)
        # losses, resist flags and probabilities in one float64 buffer: exact for float32 values
        stats = torch.zeros(n, b, 2 + classes, dtype=torch.float64, device=x.device)
        if out is not None:
            rows = [j - start for j in mine]
            lk, g, p, r = out
            grads[rows] = g.to(x.dtype)
            stats[rows, :, 0] = lk.double()
            stats[rows, :, 1] = r.double()
            stats[rows, :, 2:] = p.double()
        # each entry has one non-zero contribution (its copy's rank): the sums are exact
        self.dist.all_reduce(grads)
        self.dist.all_reduce(stats)
        return stats[..., 0].float(), grads, stats[..., 2:].float(), stats[..., 1] > 0.5, classes


class SelectiveEOTGradient(EOTGradient):
    """EOTGradient with `selective=True`: average only over the draws that still resist."""

    def __init__(self, samples: int, max_batch: int = 4096, base: Callable = plain_gradient, dist: Any = None):
        super().__init__(samples, max_batch, base, selective=True, dist=dist)


def EOT(attack: Attack, samples: int = 20, max_batch: int = 4096, selective: bool = False,
        dist: Any = None) -> Attack:
    """A new attack: `attack` with its gradients averaged over `samples` batched copies (selective:
    DiffHammer-style; dist: copies split across ranks, see EOTGradient). The attack given is left
    unchanged; wrapping an EOT attack again nests the oracles. An attack that takes its gradients
    elsewhere (`own_gradients`, e.g. AutoAttack) is refused.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))   # any [0, 1] -> logits module
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> from ssni import EOT, PGD
        >>> noisy = nn.Sequential(nn.Dropout(0.2), clf).train()   # a randomized model
        >>> attack = EOT(PGD(eps=8 / 255, steps=3, step_size=2 / 255), samples=4)
        >>> x_adv = attack(noisy, x, y, seed=0)            # each step: the mean gradient of 4 draws
        >>> attack.eot_samples, bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        (4, True)
    """
    if attack.own_gradients:
        raise ValueError(f"EOT cannot wrap {type(attack).__name__}: {attack.own_gradients}")
    wrapped = copy.copy(attack)  # shallow: same settings and bound model, its own gradient oracle
    wrapped.grad_fn = EOTGradient(samples, max_batch, base=attack.grad_fn, selective=selective, dist=dist)
    wrapped.eot_samples = samples
    wrapped.eot_selective = bool(selective)
    return wrapped
