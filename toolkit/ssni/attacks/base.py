"""Attack base class, losses, and the gradient oracle that EOT replaces (geometry: geometry.py).

Every attack maps (model, x [B,C,H,W] in [0,1], y [B]) -> x_adv with ||x_adv - x|| <= eps
(Linf or L2) and x_adv in [0,1]; torchattacks' convention (model bound at construction, then
(x, y)) works too. Gradients come from `self.grad_fn(model, x, y, loss)` so
that `EOT` can wrap any attack by swapping the oracle, without copying the attack.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import bound
from ..registry import Registry
from .geometry import check_norm, project

ATTACKS = Registry("attack")
LOSSES = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy; logits [B,K], y [B] -> [B]."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@LOSSES.register("dlr")
def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference-of-logits-ratio loss (untargeted, scale invariant); [B,K], [B] -> [B]."""
    z = logits.float()
    zs, _ = z.sort(dim=1)
    z_y = z.gather(1, y[:, None])[:, 0]
    top_is_y = (zs[:, -1] == z_y).float()
    other = zs[:, -2] * top_is_y + zs[:, -1] * (1.0 - top_is_y)
    denom = (zs[:, -1] - zs[:, -3]).clamp_min(1e-12) if z.shape[1] >= 3 else torch.ones_like(z_y)
    return -(z_y - other) / denom


@LOSSES.register("margin")
def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW-style margin: max other logit - true logit; [B,K], [B] -> [B]."""
    z = logits.float()
    z_y = z.gather(1, y[:, None])[:, 0]
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y


def uses_t_star(obj: Any) -> bool:
    """Whether a loss also takes the t*(x) and score norm of the pass, loss(logits [B,K], y [B], t [B],
    s [B]), or an attack ascends such a loss (attacks/lownoise.py)."""
    return bool(getattr(obj, "uses_t_star", False))


def plain_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Tuple[Tensor, Tensor, Tensor]:
    """One autograd pass: (per-sample loss [B], grad wrt x [B,...], logits [B,K]).

    A loss that uses t* (`uses_t_star`) gets the t*(x) and score norm of the same pass from
    `model.with_t_star(x)` (every view of an ssni RobustClassifier has it), so EOT averages them too.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if uses_t_star(loss):
            with_t = getattr(model, "with_t_star", None)
            if not callable(with_t):
                raise TypeError(f"a loss on t*(x) needs a model with with_t_star(x) -> (logits, t*, score norm) "
                                f"(a view of an ssni RobustClassifier); {type(model).__name__} has none")
            logits, t, s = with_t(x)
            per_sample = loss(logits, y, t, s)
        else:
            logits = model(x)
            per_sample = loss(logits, y)
        (grad,) = torch.autograd.grad(per_sample.sum(), x)
    return per_sample.detach(), grad.detach(), logits.detach()


def targeted_loss(loss: Callable) -> Callable:
    """The targeted variant of a per-sample loss: its negative, so ascent moves towards y (the target).

    CE: -CE(z, t) (raise the target's probability); margin: z_t - max_{j != t} z_j (make the target
    the top class); DLR: its scale-free analogue. The wrapper carries `targeted = True` so gradient
    oracles (selective EOT) can tell "still resists" from "already fooled".
    """
    def negated(logits: Tensor, y: Tensor) -> Tensor:
        return -loss(logits, y)

    negated.targeted = True  # type: ignore[attr-defined]
    negated.__name__ = f"targeted_{getattr(loss, '__name__', 'loss')}"
    return negated


def resolve_step_size(step_size: Optional[float], alpha: Optional[float], default: float) -> float:
    """`alpha` is torchattacks' name for the step size; accept either (not two different values)."""
    if step_size is not None and alpha is not None and float(step_size) != float(alpha):
        raise ValueError(f"step_size={step_size} and alpha={alpha} disagree; alpha is an alias of step_size")
    value = step_size if step_size is not None else alpha
    # a negative step would descend the loss, a zero one never move
    return float(bound(gt=0).check(default if value is None else value, "step_size"))


def check_steps(steps: Any) -> int:
    """An attack's iteration count as an int >= 1, or a one-line error (nothing is clamped)."""
    return int(bound(ge=1, integer=True).check(steps, "steps"))


class Attack:
    """Base class. Subclasses implement `run(model, x, y, generator) -> x_adv`.

    Two calling conventions: ours, `Attack(eps=...)(model, x, y, seed=...)`, and torchattacks',
    `Attack(model, eps=...)(x, y)` (the model bound at construction). `seed` given to the
    constructor is the default seed of every call (torchattacks' APGD has it); with no seed at all
    the random start follows torch's global RNG. With `targeted=True`, y holds the target labels
    and the attack ascends `targeted_loss(loss)`; torchattacks' `set_mode_targeted_by_label()` /
    `set_mode_default()` switch the same flag.
    """

    # Why EOT / per_step cannot wrap this attack, for attacks that take their gradients elsewhere
    # (another library) instead of from `grad_fn`; None: they can.
    own_gradients: Optional[str] = None

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", loss: str = "ce",
                 model: Optional[nn.Module] = None, targeted: bool = False, seed: Optional[int] = None):
        bound(ge=0, means="the perturbation budget").check(eps, "eps")
        # torchattacks spells norms "Linf" / "L2"
        self.eps, self.norm = float(eps), check_norm(norm.lower() if isinstance(norm, str) else norm)
        self.loss_name = loss
        LOSSES.get(loss)  # fail early on unknown names
        self.model, self.targeted, self.seed = model, bool(targeted), seed
        self.grad_fn: Callable = plain_gradient
        self.eot_samples = 1  # set by the EOT wrapper; reported by the evaluation
        self.eot_selective = False
        self.per_step = False  # set by perstep.per_step: the loss is taken at every reverse step

    def check_view(self, view: str) -> None:
        """A one-line ValueError if this attack cannot attack the view named `view` (a VIEWS name, or
        "fixed": the defense with the seeds of draw 0); every view by default."""

    @property
    def loss(self) -> Callable:
        """The per-sample loss the attack ascends ([B,K], [B] -> [B]); negated when targeted."""
        base = LOSSES.get(self.loss_name)
        return targeted_loss(base) if self.targeted else base

    def __call__(self, *args: Any, seed: Optional[int] = None) -> Tensor:
        """Attack a batch: (model, x, y) or, with a bound model, (x, y); returns x_adv [B,C,H,W] in [0,1]."""
        if len(args) == 3:
            model, x, y = args
        elif len(args) == 2:
            if self.model is None:
                raise TypeError(f"{type(self).__name__}(x, y) needs a model: pass it to the constructor "
                                f"(torchattacks style) or call attack(model, x, y)")
            model, (x, y) = self.model, args
        else:
            raise TypeError(f"{type(self).__name__} takes (model, x, y) or (x, y), got {len(args)} arguments")
        if x.min() < 0 or x.max() > 1:
            raise ValueError("attack inputs must be images in [0, 1]")
        seed = self.seed if seed is None else seed
        g = None
        if seed is not None:
            g = torch.Generator(device=x.device).manual_seed(int(seed))
        x_adv = self.run(model, x.detach(), y, g)
        return project(x_adv.detach(), x, self.eps, self.norm)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """torchattacks' name for calling an attack with a bound model; x [B,C,H,W] -> x_adv."""
        return self(x, y)

    def set_mode_targeted_by_label(self, quiet: bool = True) -> None:
        """torchattacks-style switch: from now on y holds target labels."""
        self.targeted = True

    def set_mode_default(self) -> None:
        """torchattacks-style switch back to the untargeted attack."""
        self.targeted = False

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings for reports."""
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm,
                "loss": self.loss_name, "eot": self.eot_samples,
                "eot_selective": self.eot_selective, "targeted": self.targeted, "per_step": self.per_step}

    def budget_head(self) -> str:
        """What the attack spends, in words, for a report's budget line: 'ce, 200 it, EOT 20'."""
        steps = getattr(self, "steps", None)
        parts = [self.loss_name] + ([f"{steps} it"] if steps is not None else [])
        parts.append(f"EOT {self.eot_samples}{' selective' if self.eot_selective else ''}")
        return ", ".join(parts)
