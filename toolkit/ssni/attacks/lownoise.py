"""The low-noise attack on sample-specific defenses: fool the classifier and lower t*(x) as well.

SSNI gives a sample that looks clean to its score norm little noise (a small t*), so an attacker who
lowers t*(x) meets a weaker purifier. Two modes, on a view whose t*(x) carries gradients (its
`with_t_star`: `adaptive`, through the purifier, the score norm and the smooth reweight; or `bare`,
the classifier alone beside the defense's smooth t*):

- joint: PGD ascending loss(f(x')) - lam * N(x'), N the noise term: log score norm (default) or t*;
- two_stage: the first `split` of the steps fool the view's classifier (PGD on the loss), the rest
  lower N(x') while it stays fooled: ascend min(margin, 0) - lam * N(x') (for a fooled sample, only
  -N counts); a step that un-fools a sample or does not lower N is undone and its step size
  halved; each sample's fooled point of lowest N is returned (the last iterate if never fooled).

Every iterate stays in the eps-ball of the original image. Gradients come from `grad_fn`, so EOT
averages them (each copy draws its own score-norm noise too).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .base import ATTACKS, LOSSES, targeted_loss
from .eot import still_resists
from .geometry import project, steepest_step
from .pgd import PGD

MODES = ("joint", "two_stage")
TARGETS = ("t_star", "score_norm")  # what the attack lowers
# views whose t*(x) carries gradients (every other view's t* is rounded and gradient-free)
T_STAR_VIEWS = ("adaptive", "bare")


def noise_term(target: str) -> Callable:
    """What the attack lowers, from t* [B] and score norm s [B] -> [B]: t* itself, or log s (t* is monotone
    in s, and log s keeps its gradient where a saturated reweight's t* has none)."""
    if target not in TARGETS:
        raise ValueError(f"lownoise target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "t_star":
        return lambda t, s: t.float()
    return lambda t, s: s.float().clamp_min(1e-12).log()


def _on_t_star(objective: Callable, targeted: bool) -> Callable:
    objective.uses_t_star = True  # type: ignore[attr-defined]
    objective.targeted = targeted  # type: ignore[attr-defined]
    return objective


def t_star_loss(loss: Callable, lam: float, target: str = "score_norm") -> Callable:
    """loss(logits, y) - lam * term(t*, s), a loss on t* (`uses_t_star`); [B,K], [B], [B], [B] -> [B]."""
    term = noise_term(target)
    return _on_t_star(lambda logits, y, t, s: loss(logits, y) - lam * term(t, s), getattr(loss, "targeted", False))


def keep_fooled_loss(margin: Callable, lam: float, target: str = "score_norm") -> Callable:
    """min(margin, 0) - lam * term(t*, s): only the noise term counts while the margin says fooled (> 0);
    [B,K], [B], [B], [B] -> [B]."""
    term = noise_term(target)
    return _on_t_star(lambda logits, y, t, s: margin(logits, y).clamp(max=0.0) - lam * term(t, s),
                      getattr(margin, "targeted", False))


@ATTACKS.register("lownoise")
class LowNoise(PGD):
    """PGD that also lowers the defense's t*(x) (mode joint or two_stage, see the module notes).

    target: what it lowers, `score_norm` (log s(x); t* is monotone in s, and log s keeps its gradient
    where a saturated reweight, e.g. SSNI-N far above the clean mean, gives t* none) or `t_star` (the
    smooth t*(x) itself; its scale is the reweight's range, so lam ~ 1 / that range, e.g. 10).
    lam weighs that term against the loss (joint) or against the margin of a sample not yet fooled
    (two_stage); split is two_stage's share of the steps spent fooling the classifier first.
    """

    uses_t_star = True  # per_step refuses it: its t* term comes from one pass

    def __init__(self, model: Optional[nn.Module] = None, eps: float = 8 / 255, norm: str = "linf",
                 steps: int = 200, step_size: Optional[float] = None, loss: str = "ce",
                 random_start: bool = True, targeted: bool = False, alpha: Optional[float] = None,
                 seed: Optional[int] = None, lam: float = 1.0, mode: str = "joint", split: float = 0.5,
                 target: str = "score_norm"):
        super().__init__(model, eps, norm, steps, step_size, loss, random_start, targeted, alpha, seed)
        noise_term(target)  # unknown names fail here
        if mode not in MODES:
            raise ValueError(f"lownoise mode must be one of {', '.join(MODES)}, got {mode!r}")
        if float(lam) < 0:
            raise ValueError(f"lownoise lam must be >= 0 (the weight of the noise term), got {lam}")
        if mode == "two_stage" and not (0.0 < float(split) < 1.0 and self.steps >= 2):
            raise ValueError(f"lownoise two_stage needs 0 < split < 1 and steps >= 2 (steps to fool, then steps "
                             f"to lower the noise term), got split={split}, steps={steps}")
        self.lam, self.mode, self.split, self.target = float(lam), mode, float(split), target

    def check_view(self, view: str) -> None:
        """Only views whose t*(x) carries gradients (adaptive, bare); elsewhere the t* term would do nothing."""
        if view not in T_STAR_VIEWS:
            raise ValueError(f"lownoise needs a view whose t*(x) has gradients ({', '.join(T_STAR_VIEWS)}), "
                             f"got {view!r}" + (" (fixed_seeds attacks the defense's rounded t*)"
                                                if view == "fixed" else ""))

    def stage_steps(self) -> tuple:
        """(steps fooling the classifier, steps lowering the noise term) of two_stage."""
        first = min(self.steps - 1, max(1, round(self.split * self.steps)))
        return first, self.steps - first

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """joint: PGD on loss - lam * N; two_stage: PGD on the loss, then lower N kept fooled; x [B,C,H,W] -> x_adv."""
        x_adv = self.start(x, generator)
        if self.mode == "joint":
            return self.ascend(model, x, y, x_adv, self.steps, t_star_loss(self.loss, self.lam, self.target))
        fool, lower = self.stage_steps()
        return self.lower_t_star(model, x, y, self.ascend(model, x, y, x_adv, fool, self.loss), lower)

    def lower_t_star(self, model: nn.Module, x: Tensor, y: Tensor, x_k: Tensor, steps: int) -> Tensor:
        """Stage two: `steps` oracle calls from x_k ascending min(margin, 0) - lam * N; each sample's fooled
        point of highest objective (lowest N), or its last iterate if never fooled; [B,...] -> [B,...]."""
        margin = LOSSES.get("margin")
        objective = keep_fooled_loss(targeted_loss(margin) if self.targeted else margin, self.lam, self.target)
        b = x.shape[0]
        shape = (b,) + (1,) * (x.dim() - 1)
        eta = torch.full(shape, self.step_size, device=x.device, dtype=x.dtype)
        best_x, best_grad = x_k.clone(), torch.zeros_like(x_k)
        best = torch.full((b,), float("-inf"), device=x.device)
        for i in range(steps):
            value, grad, logits = self.grad_fn(model, x_k, y, objective)
            fooled = ~still_resists(logits, y, objective)
            better = fooled & (value > best)
            # a step that un-fooled a sample or did not lower its N: back to its best fooled point, on
            # with half the step (sign steps of a fixed size would circle the minimum, never reach it)
            back = (~better & torch.isfinite(best)).view(shape)
            best_x[better], best[better], best_grad[better] = x_k[better], value[better], grad[better]
            x_k = torch.where(back, best_x, x_k)
            grad = torch.where(back, best_grad, grad)
            eta = torch.where(back, eta / 2, eta)
            if i + 1 < steps:  # the last call only checks the last step
                x_k = project(x_k + eta * steepest_step(grad, self.norm), x, self.eps, self.norm)
        return torch.where(torch.isfinite(best).view(shape), best_x, x_k)

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode, "lam": self.lam, "target": self.target,
                **({"split": self.split} if self.mode == "two_stage" else {})}

    def budget_head(self) -> str:
        eot = f"EOT {self.eot_samples}{' selective' if self.eot_selective else ''}"
        term = "t*" if self.target == "t_star" else "log score norm"
        if self.mode == "joint":
            return f"joint {self.loss_name} - {self.lam:g} {term}, {self.steps} it, {eot}"
        fool, lower = self.stage_steps()
        return f"two_stage {self.loss_name} {fool} it, then lower {term} {lower} it (lam {self.lam:g}), {eot}"
