"""`ssni fit-reweight`: learn a monotone reweight from clean training images only.

It builds the defense of a recipe (score network, calibration, purifier, classifier), perturbs
clean training images itself (Gaussian noise at several strengths, Linf PGD against the bare
classifier), finds the oracle t* of every copy, fits a LearnedReweight and saves its JSON and a
plot. The saved file plugs into a defense recipe as reweight: {name: learned, kwargs: {path: ...}}.

Every sample's noise, PGD start, score-norm and purification draws come from its own seeds (its index
in the run), so under torchrun the batches of samples are split across ranks (every world-th batch,
as calibrate does) and give what one process gives; rank 0 gathers the per-sample oracle results,
fits and writes, while the others wait for it (a gather, within torch's process-group timeout) and
return its file paths, or raise if any rank failed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from ..attacks import LOSSES, plain_gradient, project, random_in_ball, steepest_step
from ..config import save_config
from ..data import DataConfig, build_dataset
from ..defense import RobustClassifier
from ..io import atomic_write_json
from ..scoring import LearnedFitConfig, fit_learned, oracle_t_star, plot_reweight
from ..scoring.calibration import shard_starts
from ..seeding import block_seeds
from ..training.dist import DistContext
from .registry import command

# Offsets of this command's random streams from its seed (part of what fixes its output).
NOISE_STREAM, NORMS_STREAM = 11, 100


@dataclass
class FitReweightConfig:
    """Everything `ssni fit-reweight` needs."""

    output: str = "runs/reweight-digits"
    defense_recipe: str = "recipes/defense/digits.yaml"
    defense_overrides: List[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    count: int = 256  # clean training images; each is also perturbed every way below
    noise_std: List[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    pgd_eps: List[float] = field(default_factory=lambda: [4 / 255, 8 / 255, 16 / 255])
    pgd_steps: int = 20
    t_grid: List[float] = field(default_factory=lambda: [
        0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3])
    draws: int = 1  # purifications per (sample, t) in the oracle search
    fit: LearnedFitConfig = field(default_factory=LearnedFitConfig)
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def _over_255(eps: float) -> str:
    """8/255-style label for an Linf budget (one decimal unless it is a whole number)."""
    v = eps * 255
    return f"{round(v)}/255" if abs(v - round(v)) < 0.05 else f"{v:.1f}/255"


def _per_sample(draw: Callable[[torch.Generator], torch.Tensor], seeds: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Stack draw(generator seeded with seeds[i]) over samples: [B, ...] (sample i's draw is its own)."""
    return torch.cat([draw(torch.Generator(device=device).manual_seed(int(s))) for s in seeds])


def pgd_per_sample(classify, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                   seeds: torch.Tensor) -> torch.Tensor:
    """Linf PGD (step 2.5 eps / steps) against `classify`, sample i's random start drawn from seeds[i];
    x [B,C,H,W] in [0,1], y [B], seeds LongTensor [B] -> x_adv [B,C,H,W]."""
    shape = (1, *x.shape[1:])
    start = _per_sample(lambda g: random_in_ball(shape, eps, "linf", g, x.device), seeds, x.device)
    x_adv = project(x + start.to(x.dtype), x, eps, "linf")
    step, loss = 2.5 * eps / max(steps, 1), LOSSES.get("ce")
    for _ in range(steps):
        _, grad, _ = plain_gradient(classify, x_adv, y, loss)
        x_adv = project(x_adv + step * steepest_step(grad, "linf"), x, eps, "linf")
    return x_adv.detach()


def make_perturbed(classify, images: torch.Tensor, labels: torch.Tensor, cfg: FitReweightConfig,
                   first: int = 0) -> Dict[str, torch.Tensor]:
    """The clean images plus their noisy and PGD copies: {kind: [B,C,H,W] in [0,1]}.

    `images` are samples first .. first + B - 1 of the run; each sample's noise and PGD start come from
    its own seed (seed block per kind, its index), so a sample's copies do not depend on its batch.
    """
    sets = {"clean": images}
    for j, std in enumerate(cfg.noise_std):
        seeds = block_seeds(cfg.seed + NOISE_STREAM + j, first, images.shape[0])
        z = _per_sample(lambda g: torch.randn((1, *images.shape[1:]), generator=g, device=images.device),
                        seeds, images.device)
        sets[f"noise {std:g}"] = (images + std * z.to(images.dtype)).clamp(0.0, 1.0)
    for j, eps in enumerate(cfg.pgd_eps):
        seeds = block_seeds(cfg.seed + NOISE_STREAM + len(cfg.noise_std) + j, first, images.shape[0])
        sets[f"pgd {_over_255(eps)}"] = pgd_per_sample(classify, images, labels, eps, cfg.pgd_steps, seeds)
    return sets


@command("fit-reweight", FitReweightConfig,
         "learn a monotone reweight from oracle t* of self-perturbed clean images")
def run_fit_reweight(cfg: FitReweightConfig) -> Dict[str, Any]:
    """Fit the learned reweight; writes reweight.json, oracle.json and reweight.png (rank 0 only)."""
    dist = DistContext.from_env(cfg.device)
    result: Dict[str, Any] = {}
    try:
        mine, error = {}, None
        try:  # this rank's batches of samples; a failure is passed on, so no rank waits for a dead one
            defense = RobustClassifier.from_recipe(cfg.defense_recipe, cfg.defense_overrides, device=dist.device)
            images, labels = _training_images(cfg, dist.device)
            mine = _oracle_batches(defense, images, labels, cfg, dist.rank, dist.world_size)
        except Exception as e:
            if dist.world_size == 1:
                raise  # one process: the error itself, as before
            error = f"rank {dist.rank}: {type(e).__name__}: {e}"
        parts = dist.all_gather_object((mine, error))
        errors = [err for _, err in parts if err is not None]
        if errors:
            raise RuntimeError(f"fit-reweight failed on {'; '.join(errors)}")
        batches = {a: res for part, _ in parts for a, res in part.items()}
        error = None
        if dist.is_main:
            try:
                result = _fit(cfg, defense, [batches[a] for a in sorted(batches)], labels.shape[0])
            except BaseException as e:  # tell the waiting ranks before raising here
                error = f"{type(e).__name__}: {e}"
                dist.all_gather_object(error)
                raise
        # the other ranks wait here until rank 0 has written, and learn whether it succeeded
        error = dist.all_gather_object(error)[0]
    finally:
        dist.close()
    if error is not None:
        raise RuntimeError(f"fit-reweight failed on rank 0: {error}")
    if not dist.is_main:
        out = Path(cfg.output)
        result = {"reweight": str(out / "reweight.json"), "plot": str(out / "reweight.png"), "rank": dist.rank}
    return result


def _training_images(cfg: FitReweightConfig, device: torch.device):
    """The `count` clean training images the fit uses (a seeded subset, in index order) and labels."""
    ds = build_dataset(cfg.data, "train")  # clean training data only
    n = min(cfg.count, len(ds))
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.sort(torch.randperm(len(ds), generator=g)[:n]).values
    return ds.images[idx].to(device), ds.labels[idx].to(device)


def _oracle_batches(defense: RobustClassifier, images: torch.Tensor, labels: torch.Tensor,
                    cfg: FitReweightConfig, rank: int, world: int) -> Dict[int, Dict[str, Any]]:
    """Perturbed copies, score norms and oracle t* of this rank's batches (every world-th, `shard_starts`):
    {first index: {kind: {"norm": [b], "t": [b], "correct": [b] (at t = 0)}}} (CPU tensors); per-sample seeds,
    so the results do not depend on the batching or the number of ranks."""
    from tqdm.auto import tqdm

    n, bs = images.shape[0], cfg.batch_size
    purify = lambda xb, tb, seeds: defense.purifier(xb, tb, seeds=seeds)  # noqa: E731
    out: Dict[int, Dict[str, Any]] = {}
    for a in tqdm(shard_starts(n, bs, rank, world), disable=not (cfg.progress and rank == 0), desc="oracle t*"):
        xb, yb = images[a:a + bs], labels[a:a + bs]
        sets = make_perturbed(defense.classify, xb, yb, cfg, first=a)
        res: Dict[str, Any] = {}
        with torch.no_grad():
            for k, (kind, x) in enumerate(sets.items()):
                s = defense.scorer(x, seeds=block_seeds(cfg.seed + NORMS_STREAM + k, a, x.shape[0])).float().cpu()
                o = oracle_t_star(purify, defense.classify, x, yb, cfg.t_grid, block_seeds(k + 1, a, x.shape[0]),
                                  cfg.draws, cfg.batch_size)
                res[kind] = {"norm": s, "t": o["t"].cpu(), "correct": o["correct"][:, 0].cpu()}
        out[a] = res
    return out


def _fit(cfg: FitReweightConfig, defense: RobustClassifier, batches: List[Dict[str, Any]], n: int) -> Dict[str, Any]:
    """Fit and write (rank 0) from every batch's oracle results, in sample order."""
    kinds_order = list(batches[0]) if batches else []
    norms = [torch.cat([b[kind]["norm"] for b in batches]) for kind in kinds_order]
    oracle = [torch.cat([b[kind]["t"] for b in batches]) for kind in kinds_order]
    bare_acc = {kind: float(torch.cat([b[kind]["correct"] for b in batches]).mean()) for kind in kinds_order}
    kinds = [kind for kind in kinds_order for _ in range(n)]
    s_all, t_all = torch.cat(norms), torch.cat(oracle)
    # the curve must be able to reach the largest oracle value on the grid
    fit_cfg = dataclasses.replace(cfg.fit, t_max=max(cfg.fit.t_max, max(cfg.t_grid)))
    curve, info = fit_learned(s_all, t_all, fit_cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    per_kind = {}
    with torch.no_grad():
        pred = curve(s_all, smooth=False)
    for k, kind in enumerate(kinds_order):
        sl = slice(k * n, (k + 1) * n)
        ok = torch.isfinite(t_all[sl])
        per_kind[kind] = {"mean_norm": float(norms[k].mean()),
                          "reachable": float(ok.float().mean()),
                          "mean_oracle_t": float(t_all[sl][ok].mean()) if ok.any() else None,
                          "mean_fitted_t": float(pred[sl].mean()),
                          "bare_accuracy": bare_acc[kind]}
    path = curve.save(out / "reweight.json", extra={"fit": info, "per_kind": per_kind,
                                                    "t_grid": list(cfg.t_grid)})
    atomic_write_json(out / "oracle.json", {"kinds": kinds, "norms": s_all.tolist(),
                                            "oracle_t": [None if not torch.isfinite(v) else
                                                         float(v) for v in t_all]})
    perturbed = {kind: norms[k] for k, kind in enumerate(kinds_order) if kind != "clean"}
    ok = torch.isfinite(t_all)
    recipe_curve = f"recipe ({type(defense.reweight).__name__})"
    png = plot_reweight({"learned": curve, recipe_curve: defense.reweight},
                        out / "reweight.png", clean=norms[0], perturbed=perturbed, points=(s_all[ok], t_all[ok]),
                        title="learned reweight: oracle t* of clean / noisy / PGD training copies")
    return {"reweight": str(path), "plot": str(png), "fit": info, "per_kind": per_kind}
