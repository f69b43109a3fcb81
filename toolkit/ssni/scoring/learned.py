"""Learning the reweight: self-made perturbations, oracle t* per sample, and the monotone fit.

The fit uses clean training images only. Its caller perturbs them (random noise at several
strengths, Linf PGD against the bare classifier: `ssni fit-reweight`); this module finds for each
perturbed copy the smallest t* on a grid at which purification keeps the classifier right (the oracle t*), and fits a
`LearnedReweight` to (score norm, oracle t*) pairs with an asymmetric squared loss in which
under-noising (predicting t* below the oracle) costs `under_cost` times more than over-noising.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..seeding import draw_seeds_of
from .reweight import LearnedReweight


def gaussian_noise(x: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """x + N(0, std^2), clamped to [0,1]; x [B,C,H,W] -> [B,C,H,W]."""
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * z).clamp(0.0, 1.0)


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


# -- the monotone fit --------------------------------------------------------------------------
@dataclass
class LearnedFitConfig:
    """How the monotone curve is fitted to (score norm, oracle t*) pairs."""

    knots: int = 12
    under_cost: float = 4.0  # under-noising costs this many times more than over-noising
    steps: int = 1500
    lr: float = 0.05
    t_min: float = 0.0
    t_max: float = 0.3
    smooth_width: float = 0.05


def asymmetric_loss(pred: Tensor, target: Tensor, under_cost: float) -> Tensor:
    """Per-sample asymmetric squared error: under_cost * (target - pred)^2 where pred < target."""
    d = target - pred
    return torch.where(d > 0, under_cost * d * d, d * d)


def knot_positions(s: Tensor, k: int) -> Tensor:
    """k strictly increasing knots at evenly spaced quantiles of the norms s [N] -> [<=k]."""
    q = torch.quantile(s.double(), torch.linspace(0, 1, k, dtype=torch.float64)).float()
    q = torch.unique(q)
    if q.numel() < 2:
        q = torch.stack([q[0] - 1e-3, q[0] + 1e-3])
    return q


def fit_learned(s: Tensor, t: Tensor, cfg: LearnedFitConfig = LearnedFitConfig(),
                weights: Optional[Tensor] = None,
                knots: Optional[Tensor] = None) -> tuple[LearnedReweight, Dict[str, float]]:
    """Fit a LearnedReweight to norms s [N] and oracle t* [N] (NaN rows are dropped).

    Full-batch Adam on the curve's logits; returns (reweight, {"loss", "count", ...}).
    """
    s, t = s.detach().float().cpu().flatten(), t.detach().float().cpu().flatten()
    if s.shape != t.shape:
        raise ValueError(f"norms and oracle t* must have the same length, got {s.numel()} and "
                         f"{t.numel()}")
    keep = torch.isfinite(s) & torch.isfinite(t)
    w = torch.ones_like(s) if weights is None else weights.detach().float().cpu().flatten()
    s, t, w = s[keep], t[keep].clamp(cfg.t_min, cfg.t_max), w[keep]
    if s.numel() < 2:
        raise ValueError(f"need at least 2 usable (norm, oracle t*) pairs, got {s.numel()}")
    kn = knot_positions(s, cfg.knots) if knots is None else knots
    curve = LearnedReweight(knots=kn.tolist(), t_min=cfg.t_min, t_max=cfg.t_max,
                            smooth_width=cfg.smooth_width)
    opt = torch.optim.Adam(curve.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    w = w / w.sum()
    for _ in range(cfg.steps):
        pred = curve.curve(s, smooth=False)
        loss = (asymmetric_loss(pred, t, cfg.under_cost) * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        pred = curve(s, smooth=False)
        info = {"loss": float((asymmetric_loss(curve.curve(s, False), t, cfg.under_cost) * w).sum()),
                "count": int(s.numel()), "dropped": int((~keep).sum()),
                "under_rate": float((pred < t - 1e-6).float().mean()),
                "mean_excess": float((pred - t).clamp(min=0).mean())}
    curve.logits.requires_grad_(False)
    return curve, info
