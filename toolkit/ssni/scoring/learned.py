"""Learning the reweight against attacks: accuracy tables over a grid of noise levels, and the fit.

`ssni fit-reweight` attacks clean training images through the defense (at several constant t*, then
through the current learned curve) and measures, for every clean and attacked copy, its score norm
and how often purification at each grid t keeps the classifier right (`oracle_t_star`'s `correct`
table). This module fits a monotone `LearnedReweight` to those tables: it maximises

    robust(c) + clean_weight * clean(c)

where clean(c) is the mean over images of the accuracy of the clean copy at t = c(s_clean), and
robust(c) is measured one of two ways (`RobustFitConfig.robust`):

- "per_attack" (the default): the attacked sets are grouped by the attack that made them; an
  attack's accuracy is the mean over its sets and images of each copy's accuracy at t =
  c(s_attacked), and robust(c) is the (soft) minimum over attacks: the worst attack's accuracy, as
  `ssni evaluate` reports robust accuracy per attack.
- "worst_copy": the mean over images of the (soft) minimum over every attacked set: an image counts
  only as far as it survives its worst copy (the evaluation's worst-case row). With many sets this
  minimum is biased low where purification is noisier (a minimum over J noisy two-draw estimates),
  so it pulls t* down: on digits, nine sets put the attacked t* at 0.06 where each set alone peaks
  at 0.075-0.1.

Accuracy between grid points is interpolated linearly in t, so the objective has a gradient with
respect to the curve's heights.

A copy crafted against one t* says little about another: a perturbation aimed at purification at
t = 0.1 often fails against t = 0.04, yet an attacker facing 0.04 would aim at 0.04. With a `cap`
[N, G] (each image attacked at every grid t and measured at that same t), an attacked copy sent to
t is credited at most the cap at t, so robustness is only counted where an attack aimed at that t*
was tried.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..config import setting
from ..seeding import draw_seeds_of
from .reweight import LearnedReweight


# -- oracle t* ---------------------------------------------------------------------------------
@torch.no_grad()
def oracle_t_star(purify: Callable[..., Tensor], classify: Callable[[Tensor], Tensor], x: Tensor,
                  y: Tensor, t_grid: Sequence[float], seeds: Optional[Tensor] = None,
                  draws: int = 1, max_batch: int = 256, progress: bool = False) -> Dict[str, Tensor]:
    """Smallest grid t at which purification keeps the classifier right, per sample.

    purify(x, t [B], seeds=[B]) -> [B,C,H,W]; classify(x) -> logits. t = 0 means "no
    purification". A sample is right at t when at least half of `draws` purifications are
    classified correctly. Returns {"t": [N] (NaN where no grid t works), "correct": [N, G]
    fraction right, "reachable": [N] bool}.
    """
    from tqdm.auto import tqdm

    grid = torch.as_tensor(list(t_grid), dtype=torch.float32)
    if grid.dim() != 1 or grid.numel() < 1 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"t_grid must be increasing numbers in [0, 1], got {list(t_grid)}")
    n, g = x.shape[0], grid.numel()
    if seeds is None:
        seeds = torch.arange(n)
    frac = torch.zeros(n, g)
    # Every (sample, grid t, draw) is one row; rows share the sample's seed per draw across t
    # (common random numbers), so neighbouring t are compared under the same noise.
    rows_s = torch.arange(n).repeat_interleave(g * draws)
    rows_t = torch.arange(g).repeat_interleave(draws).repeat(n)
    rows_d = torch.arange(draws).repeat(n * g)
    for a in tqdm(range(0, rows_s.numel(), max_batch), disable=not progress, desc="oracle t*"):
        si, ti, di = (r[a:a + max_batch] for r in (rows_s, rows_t, rows_d))
        xb, tb = x[si], grid[ti].to(x.device)
        out = xb.clone()
        todo = tb > 0
        if todo.any():
            sd = draw_seeds_of(seeds[si], di)[todo]
            out[todo] = purify(xb[todo], tb[todo], seeds=sd)
        ok = (classify(out).argmax(1).cpu() == y[si].cpu()).float()
        frac.index_put_((si, ti), ok / draws, accumulate=True)
    right = frac >= 0.5
    reachable = right.any(1)
    first = torch.argmax(right.int(), dim=1)  # first True (0 when none; masked below)
    t = torch.where(reachable, grid[first], torch.full((n,), float("nan")))
    return {"t": t, "correct": frac, "reachable": reachable}


# -- the fit against attacks ------------------------------------------------------------------
@dataclass
class RobustFitConfig:
    """How the monotone curve is fitted to accuracy tables (the objective's trade-off included)."""

    knots: int = setting(12, ge=2)
    # one point of clean accuracy is worth this many points of robust accuracy (the trade-off)
    clean_weight: float = setting(2.0, ge=0)
    # temperature of the soft minimum over attacks, in accuracy units (0: the hard minimum)
    softmin: float = setting(0.05, ge=0, means="0: the hard minimum")
    steps: int = setting(400, ge=1)
    lr: float = setting(0.1, gt=0)
    restarts: int = setting(4, ge=0)  # random initialisations besides the warm start; the best objective wins
    t_min: float = setting(0.0, ge=0, le=1)
    t_max: float = setting(0.3, ge=0, le=1)
    smooth_width: float = setting(0.05, gt=0)
    # "per_attack": the worst attack's mean accuracy; "worst_copy": each image's worst set (module doc)
    robust: str = "per_attack"


def interpolate_accuracy(table: Tensor, grid: Tensor, t: Tensor) -> Tensor:
    """Accuracy at noise levels t, linear in t between grid points (differentiable in t);
    table [..., G], grid [G] increasing, t [...] inside [grid[0], grid[-1]] -> [...]."""
    g = grid.to(t)
    if bool((t < g[0] - 1e-6).any()) or bool((t > g[-1] + 1e-6).any()):
        raise ValueError(f"noise levels must lie inside the accuracy grid [{float(g[0])}, {float(g[-1])}], got "
                         f"[{float(t.min())}, {float(t.max())}]")
    i = (torch.searchsorted(g, t.detach().contiguous(), right=True) - 1).clamp(0, g.numel() - 2)
    lo, hi = g[i], g[i + 1]
    w = ((t - lo) / (hi - lo)).clamp(0.0, 1.0)
    a = table.to(t).gather(-1, i[..., None])[..., 0]
    b = table.to(t).gather(-1, (i + 1)[..., None])[..., 0]
    return a + w * (b - a)


def soft_minimum(v: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """Soft minimum over `dim`, -T logsumexp(-v/T), within T log J below the hard minimum (the hard
    minimum at T = 0); [..., J] -> [...]."""
    if temperature <= 0:
        return v.min(dim).values
    return -temperature * torch.logsumexp(-v / temperature, dim)


def attacked_accuracy(adv_acc: Tensor, grid: Tensor, t_adv: Tensor, cap: Optional[Tensor] = None) -> Tensor:
    """Accuracy of each attacked copy at its t, at most the cap at that t (module doc);
    adv_acc [N,J,G], t_adv [N,J], cap [N,G] or None -> [N,J]."""
    acc = interpolate_accuracy(adv_acc, grid, t_adv)
    if cap is None:
        return acc
    return torch.minimum(acc, interpolate_accuracy(cap[:, None, :].expand_as(adv_acc), grid, t_adv))


ROBUST_MODES = ("per_attack", "worst_copy")


def check_robust_mode(mode: str) -> str:
    """`mode` if it is one of ROBUST_MODES, else a one-line ValueError."""
    if mode not in ROBUST_MODES:
        raise ValueError(f"robust must be one of {', '.join(ROBUST_MODES)}, got {mode!r}")
    return mode


def attack_accuracies(per_set: Tensor, groups: Optional[Sequence[int]]) -> Tensor:
    """Each attack's accuracy: the mean over its sets and the images; per_set [N,J] (each copy's
    accuracy), groups [J] (the attack of each set; None: one attack per set) -> [A]."""
    if groups is None:
        return per_set.mean(0)
    g = torch.as_tensor(groups, dtype=torch.long)
    return torch.stack([per_set[:, g == a].mean() for a in torch.unique(g)])


def robust_accuracy(per_set: Tensor, mode: str, groups: Optional[Sequence[int]] = None,
                    temperature: float = 0.0) -> Tensor:
    """Robust accuracy of per_set [N,J] (each copy's accuracy) as `mode` says (module doc), with a
    soft minimum at `temperature` (0: the hard minimum) -> scalar."""
    if check_robust_mode(mode) == "per_attack":
        return soft_minimum(attack_accuracies(per_set, groups), temperature, 0)
    return soft_minimum(per_set, temperature, 1).mean()


def table_scores(curve: Callable[..., Tensor], grid: Tensor, clean_s: Tensor, clean_acc: Tensor,
                 adv_s: Tensor, adv_acc: Tensor, cap: Optional[Tensor] = None, robust: str = "per_attack",
                 groups: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Clean and robust accuracy (as `robust` says) a reweight gets on the tables, with its hard
    (rounded) t*, and each attack's accuracy; clean_s [N], clean_acc [N,G], adv_s [N,J],
    adv_acc [N,J,G], cap [N,G] or None, groups [J] (each set's attack) or None."""
    with torch.no_grad():
        n, j = adv_s.shape
        # a curve leaving the grid raises (interpolate_accuracy): accuracy is unknown there
        t_clean = curve(clean_s.float(), smooth=False)
        t_adv = curve(adv_s.reshape(-1).float(), smooth=False).view(n, j)
        clean = interpolate_accuracy(clean_acc, grid, t_clean)
        per_set = attacked_accuracy(adv_acc, grid, t_adv, cap)  # tables follow t's dtype
    return {"clean": float(clean.mean()), "robust": float(robust_accuracy(per_set, robust, groups)),
            "per_attack": [float(v) for v in attack_accuracies(per_set, groups)],
            "worst_copy": float(per_set.min(1).values.mean()),
            "mean_t_clean": float(t_clean.mean()), "mean_t_attacked": float(t_adv.mean())}


def _check_tables(grid: Tensor, clean_s: Tensor, clean_acc: Tensor, adv_s: Tensor, adv_acc: Tensor,
                  cap: Optional[Tensor] = None) -> None:
    n, g = clean_acc.shape
    if cap is not None and (cap.shape != (n, g) or not bool(torch.isfinite(cap).all())):
        raise ValueError(f"cap must be a finite [N, G] = [{n}, {g}] table (each image attacked at each grid t, "
                         f"measured there), got {list(cap.shape)}")
    if clean_s.shape != (n,) or adv_s.dim() != 2 or adv_s.shape[0] != n or adv_acc.shape != (*adv_s.shape, g) \
            or grid.shape != (g,):
        raise ValueError(f"accuracy tables do not fit together: clean_s {list(clean_s.shape)}, clean_acc "
                         f"{list(clean_acc.shape)}, adv_s {list(adv_s.shape)}, adv_acc {list(adv_acc.shape)}, grid "
                         f"{list(grid.shape)} (expected [N], [N,G], [N,J], [N,J,G], [G])")
    if n < 1 or adv_s.shape[1] < 1:
        raise ValueError(f"need at least one image and one attack to fit, got {n} images and {adv_s.shape[1]} attacks")
    for name, v in (("clean_s", clean_s), ("adv_s", adv_s), ("clean_acc", clean_acc), ("adv_acc", adv_acc)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} has NaN/Inf entries")


def fit_robust(grid: Sequence[float] | Tensor, clean_s: Tensor, clean_acc: Tensor, adv_s: Tensor,
               adv_acc: Tensor, cfg: RobustFitConfig = RobustFitConfig(),
               init: Optional[LearnedReweight] = None, seed: int = 0,
               cap: Optional[Tensor] = None,
               groups: Optional[Sequence[int]] = None) -> tuple[LearnedReweight, Dict[str, Any]]:
    """Fit a LearnedReweight to accuracy tables: maximise robust + clean_weight * clean (module doc).

    grid [G] (noise levels of the tables' columns), clean_s [N], clean_acc [N,G], adv_s [N,J],
    adv_acc [N,J,G], cap [N,G] or None (an attacked copy at t counts at most cap(t)), groups [J]
    (the attack that made each set, for cfg.robust = "per_attack"; None: one per set). Knots at
    quantiles of all norms; full-batch Adam on the heights' logits from `init` (when given, and its
    knots are kept) and from `restarts` random starts; returns the curve with the best objective of
    its hard (rounded) t* and {"objective", "clean", "robust", ...}.
    """
    grid = torch.as_tensor(grid, dtype=torch.float32).flatten()
    clean_s, clean_acc = clean_s.detach().float().cpu(), clean_acc.detach().float().cpu()
    adv_s, adv_acc = adv_s.detach().float().cpu(), adv_acc.detach().float().cpu()
    cap = None if cap is None else cap.detach().float().cpu()
    _check_tables(grid, clean_s, clean_acc, adv_s, adv_acc, cap)
    if not float(grid[0]) <= cfg.t_min <= cfg.t_max <= float(grid[-1]):
        raise ValueError(f"the curve's range [t_min, t_max] = [{cfg.t_min}, {cfg.t_max}] must lie inside the "
                         f"accuracy grid [{float(grid[0])}, {float(grid[-1])}]")
    if cfg.clean_weight < 0:
        raise ValueError(f"clean_weight must be >= 0, got {cfg.clean_weight}")
    check_robust_mode(cfg.robust)
    n, j = adv_s.shape
    if groups is not None and len(groups) != j:
        raise ValueError(f"groups must name the attack of each of the {j} attacked sets, got {len(groups)}")
    groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.long)  # once, not per step
    knots = init.knots.cpu() if init is not None else knot_positions(torch.cat([clean_s, adv_s.flatten()]), cfg.knots)
    flat_adv = adv_s.reshape(-1)

    def objective(curve: LearnedReweight, hard: bool) -> tuple[Tensor, Tensor, Tensor]:
        if hard:
            tc, ta = curve(clean_s, smooth=False), curve(flat_adv, smooth=False)
        else:
            tc, ta = curve.curve(clean_s, False), curve.curve(flat_adv, False)
        clean = interpolate_accuracy(clean_acc, grid, tc)
        per_set = attacked_accuracy(adv_acc, grid, ta.view(n, j), cap)
        robust = robust_accuracy(per_set, cfg.robust, groups, 0.0 if hard else cfg.softmin)
        return robust + cfg.clean_weight * clean.mean(), clean.mean(), robust

    g = torch.Generator().manual_seed(seed)
    starts = [] if init is None else [init.logits.detach().cpu().clone()]
    starts += [torch.zeros(knots.numel() + 1)] + [torch.randn(knots.numel() + 1, generator=g)
                                                   for _ in range(cfg.restarts)]
    best = None
    for k, logits in enumerate(starts):
        curve = LearnedReweight(knots=knots.tolist(), logits=logits.tolist(), t_min=cfg.t_min, t_max=cfg.t_max,
                                smooth_width=cfg.smooth_width)
        opt = torch.optim.Adam(curve.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
        for _ in range(cfg.steps):
            loss = -objective(curve, hard=False)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            obj, clean, robust = objective(curve, hard=True)
        if best is None or float(obj) > best[1]["objective"] + 1e-9:
            best = (curve, {"objective": float(obj), "clean": float(clean), "robust": float(robust),
                            "start": "warm" if (init is not None and k == 0) else f"start {k}"})
    curve, info = best
    curve.logits.requires_grad_(False)
    info.update({"images": n, "attacks": j, "clean_weight": cfg.clean_weight, "capped": cap is not None,
                 "robust_over": cfg.robust})
    return curve, info


def knot_positions(s: Tensor, k: int) -> Tensor:
    """k strictly increasing knots at evenly spaced quantiles of the norms s [N] -> [<=k]."""
    q = torch.quantile(s.double(), torch.linspace(0, 1, k, dtype=torch.float64)).float()
    q = torch.unique(q)
    if q.numel() < 2:
        q = torch.stack([q[0] - 1e-3, q[0] + 1e-3])
    return q
