"""`ssni fit-reweight`: learn a monotone reweight from clean training images only.

It builds the defense of a recipe (score network, calibration, purifier, classifier), perturbs
clean training images itself (Gaussian noise at several strengths, Linf PGD against the bare
classifier), finds the oracle t* of every copy, fits a LearnedReweight and saves its JSON and a
plot. The saved file plugs into a defense recipe as reweight: {name: learned, kwargs: {path: ...}}.

Under torchrun rank 0 does all the work and writes (the PGD copies share one random stream, so the
work is not split); the other ranks wait for it (a gather, within torch's process-group timeout) and
return its file paths, or raise if rank 0 failed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..attacks import PGD
from ..config import save_config
from ..data import DataConfig, build_dataset
from ..defense import RobustClassifier
from ..io import atomic_write_json
from ..scoring import LearnedFitConfig, compute_norms, fit_learned, gaussian_noise, oracle_t_star, plot_reweight
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


def make_perturbed(classify, images: torch.Tensor, labels: torch.Tensor, cfg: FitReweightConfig,
                   device: torch.device) -> Dict[str, torch.Tensor]:
    """The clean images plus their noisy and PGD copies: {kind: [N,C,H,W] in [0,1]}."""
    from tqdm.auto import tqdm

    g = torch.Generator(device=device).manual_seed(cfg.seed + NOISE_STREAM)
    sets = {"clean": images}
    for std in cfg.noise_std:
        sets[f"noise {std:g}"] = gaussian_noise(images, std, g)
    for eps in cfg.pgd_eps:
        out = []
        for a in tqdm(range(0, images.shape[0], cfg.batch_size), disable=not cfg.progress,
                      desc=f"pgd {eps:.4f}"):
            xb, yb = images[a:a + cfg.batch_size], labels[a:a + cfg.batch_size]
            attack = PGD(eps=eps, steps=cfg.pgd_steps, step_size=2.5 * eps / max(cfg.pgd_steps, 1))
            out.append(attack.run(classify, xb, yb, g))  # the shared generator: one stream
        sets[f"pgd {_over_255(eps)}"] = torch.cat(out)
    return sets


@command("fit-reweight", FitReweightConfig,
         "learn a monotone reweight from oracle t* of self-perturbed clean images")
def run_fit_reweight(cfg: FitReweightConfig) -> Dict[str, Any]:
    """Fit the learned reweight; writes reweight.json, oracle.json and reweight.png (rank 0 only)."""
    dist = DistContext.from_env(cfg.device)
    result: Dict[str, Any] = {}
    error = None
    if dist.is_main:
        try:
            result = _fit(cfg, dist.device)
        except BaseException as e:  # tell the waiting ranks before raising here
            error = f"{type(e).__name__}: {e}"
            dist.all_gather_object(error)
            dist.close()
            raise
    # the other ranks wait here until rank 0 has written, and learn whether it succeeded
    error = dist.all_gather_object(error)[0]
    dist.close()
    if error is not None:
        raise RuntimeError(f"fit-reweight failed on rank 0: {error}")
    if not dist.is_main:
        out = Path(cfg.output)
        result = {"reweight": str(out / "reweight.json"), "plot": str(out / "reweight.png"), "rank": dist.rank}
    return result


def _fit(cfg: FitReweightConfig, device: torch.device) -> Dict[str, Any]:
    """The work of `run_fit_reweight`, in one process."""
    defense = RobustClassifier.from_recipe(cfg.defense_recipe, cfg.defense_overrides,
                                           device=device)
    ds = build_dataset(cfg.data, "train")  # clean training data only
    n = min(cfg.count, len(ds))
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.sort(torch.randperm(len(ds), generator=g)[:n]).values
    images, labels = ds.images[idx].to(device), ds.labels[idx].to(device)
    sets = make_perturbed(defense.classify, images, labels, cfg, device)

    norms, oracle, kinds, bare_acc = [], [], [], {}
    with torch.no_grad():
        for k, (kind, x) in enumerate(sets.items()):
            s = compute_norms(defense.scorer, x, cfg.batch_size, cfg.seed + NORMS_STREAM + k, device,
                              cfg.progress, f"norms {kind}")
            seeds = block_seeds(k + 1, 0, n)
            purify = lambda xb, tb, seeds: defense.purifier(xb, tb, seeds=seeds)  # noqa: E731
            res = oracle_t_star(purify, defense.classify, x, labels, cfg.t_grid, seeds,
                                cfg.draws, cfg.batch_size, cfg.progress)
            bare_acc[kind] = float(res["correct"][:, 0].mean())
            norms.append(s)
            oracle.append(res["t"])
            kinds += [kind] * n
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
    for k, kind in enumerate(sets):
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
    perturbed = {kind: norms[k] for k, kind in enumerate(sets) if kind != "clean"}
    ok = torch.isfinite(t_all)
    recipe_curve = f"recipe ({type(defense.reweight).__name__})"
    png = plot_reweight({"learned": curve, recipe_curve: defense.reweight},
                        out / "reweight.png", clean=norms[0], perturbed=perturbed, points=(s_all[ok], t_all[ok]),
                        title="learned reweight: oracle t* of clean / noisy / PGD training copies")
    return {"reweight": str(path), "plot": str(png), "fit": info, "per_kind": per_kind}
