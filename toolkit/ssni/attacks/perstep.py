"""Per-step ("full_intermediate", DiffAttack-style) loss: the attack's loss taken at every reverse
step of the purification, not only on its output.

The gradient of the final loss alone can be weak where the last steps flatten it; a loss on every
intermediate image gives each step its own direct gradient path (DiffAttack's observation; DiffBreak
calls this gradient mode full_intermediate). The model must expose `stepwise(x) -> logits [S,B,K]`,
the classifier's logits on the image after each reverse step, the last entry being its normal
output: every view of `ssni.defense.RobustClassifier` does. The oracle composes with EOT:
`EOTGradient(samples, base=per_step_gradient)`, or `EOT(per_step(attack), samples)`.
"""
from __future__ import annotations

import copy
from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .base import Attack, plain_gradient, uses_t_star


def per_step_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
    """Ascend the mean over steps of the per-sample loss: (final-step loss [B], grad [B,...], final logits [B,K]).

    The loss returned is the final step's (what the defense outputs, so an attack's best-point
    bookkeeping compares what is evaluated); the gradient is that of mean_s loss(logits[s], y).
    """
    stepwise = getattr(model, "stepwise", None)
    if not callable(stepwise):
        raise TypeError(f"the per-step loss needs a model with stepwise(x) -> logits [S,B,K] (a view of an "
                        f"ssni RobustClassifier); {type(model).__name__} has none")
    if uses_t_star(loss):  # its t* term comes from one pass, not from every step
        raise ValueError("the per-step loss does not combine with a loss on t*(x) (the low-noise attack); "
                         "drop per_step")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = stepwise(x)
        if logits.dim() != 3 or logits.shape[1] != x.shape[0]:
            raise ValueError(f"stepwise(x) must return logits [S, B={x.shape[0]}, K], got {list(logits.shape)}")
        s, b = logits.shape[:2]
        per = loss(logits.reshape(s * b, -1), y.repeat(s)).view(s, b)
        (grad,) = torch.autograd.grad(per.mean(0).sum(), x)
    return per[-1].detach(), grad.detach(), logits[-1].detach()


def _under_per_step(fn: Callable) -> Callable:
    """The oracle `fn` with its innermost plain gradient replaced by per_step_gradient."""
    if fn is plain_gradient or fn is per_step_gradient:
        return per_step_gradient
    if hasattr(fn, "base"):  # a wrapping oracle (EOT): keep it, put the per-step loss under it
        wrapped = copy.copy(fn)
        wrapped.base = _under_per_step(fn.base)
        return wrapped
    raise ValueError(f"per_step: cannot put the per-step loss under the gradient oracle {fn!r}; "
                     f"apply per_step to the plain attack first")


def per_step(attack: Attack) -> Attack:
    """A new attack: `attack` ascending the per-step loss (per_step_gradient); the one given is unchanged.

    An EOT-wrapped attack keeps its EOT averaging, with the per-step loss under it. An attack that
    takes its gradients elsewhere (`own_gradients`, e.g. AutoAttack) or ascends a loss on t*(x)
    (`uses_t_star`, the low-noise attack) is refused.
    """
    if attack.own_gradients:
        raise ValueError(f"per_step cannot wrap {type(attack).__name__}: {attack.own_gradients}")
    if uses_t_star(attack):
        raise ValueError(f"per_step cannot wrap {type(attack).__name__}: its loss on t*(x) comes from one pass, "
                         "not from every reverse step; drop per_step")
    wrapped = copy.copy(attack)  # shallow: same settings and bound model, its own gradient oracle
    wrapped.grad_fn = _under_per_step(attack.grad_fn)
    wrapped.per_step = True
    return wrapped
