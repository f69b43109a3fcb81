"""`ssni fit-reweight`: learn a monotone reweight against the attacks the defense will face.

The engine (attacked sets, tables, the fit, the held-out check) is `ssni.evaluate.fit`; this
command runs it and writes what it found: reweight.json (the curve and everything behind it),
reweight.png (the curves over the score-norm histograms) and report.md (rank 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..config import save_config
from ..dist import DistContext
from ..evaluate.fit import (  # noqa: F401  (Fit, check_*: their names here are kept for callers and tests)
    Fit,
    FitResult,
    FitReweightConfig,
    check_fit_config,
    check_fit_images_unseen,
    fit_reweight,
)
from ..evaluate.report import pct_ci
from ..io import atomic_write_text
from ..scoring import plot_reweight
from .registry import command


@command("fit-reweight", FitReweightConfig,
         "learn a monotone reweight against attacks through the defense (clean training images only)")
def run_fit_reweight(cfg: FitReweightConfig) -> Dict[str, Any]:
    """Fit the learned reweight; writes reweight.json, reweight.png and report.md (rank 0)."""
    check_fit_config(cfg)
    check_fit_images_unseen(cfg)
    dist = DistContext.from_env(cfg.device)
    try:
        res = fit_reweight(cfg, dist)
        out = res.fit.out
        if not dist.is_main:
            return {"reweight": str(out / "reweight.json"), "plot": str(out / "reweight.png"), "rank": dist.rank,
                    "computed": res.fit.computed}
        return _write(cfg, res, out)
    finally:
        dist.close()


def _write(cfg: FitReweightConfig, res: FitResult, out: Path) -> Dict[str, Any]:
    """reweight.json, reweight.png and report.md of a finished fit."""
    budgets = res.budgets()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    path = res.curve.save(out / "reweight.json", extra={
        "trained_against": budgets, "objective": f"robust + {cfg.fit.clean_weight:g} * clean",
        "fit": res.info, "rounds": res.rounds, "on_fit_tables": res.on_tables, "heldout": res.heldout,
        "t_grid": list(cfg.t_grid), "start_t": res.levels, "capped": cfg.cap, "robust_over": cfg.fit.robust,
        "attacks": res.attack_names, "split": cfg.split})
    png = _plot(res, out / "reweight.png")
    report = _report(cfg, res, budgets)
    atomic_write_text(out / "report.md", report)
    if cfg.progress:
        print(report, flush=True)
    return {"reweight": str(path), "plot": str(png), "report": str(out / "report.md"),
            "clean_weight": cfg.fit.clean_weight, "computed": res.fit.computed}


def _plot(res: FitResult, path: Path) -> Path:
    """The curves over histograms of clean, noisy and attacked-through-defense score norms."""
    fit, clean, members, sets = res.fit, res.clean, res.members, res.sets
    perturbed = {f"noise {fit.cfg.noise_std:g}": clean["noisy_norm"]}
    round0 = [k for k, m in enumerate(members) if m.name.startswith("round0-")]
    mid = min(round0, key=lambda k: abs(members[k].reweight.t_base - 0.1))  # DBP closest to t* = 0.1
    perturbed[f"attacked through DBP t*={members[mid].reweight.t_base:g}"] = sets[mid]["norm"]
    last = max(int(m.name.split("-")[0][5:]) for m in members)
    for k, m in enumerate(members):
        if last > 0 and m.name.startswith(f"round{last}-"):
            perturbed[f"attacked through the curve ({m.spec.name})"] = sets[k]["norm"]
    return plot_reweight({"learned": res.curve, **res.compare}, path, clean=clean["norm"], perturbed=perturbed,
                         title="learned reweight (fitted against attacks through the defense)")


def _pct(m: Dict[str, Any], key: str) -> str:
    return pct_ci(m[key], m[f"{key}_ci"])


RESERVE_WORDS = {"train": "", "reserve": " held back from training the networks (data.reserve)"}
ROBUST_WORDS = {"per_attack": "robust: the worst attack's accuracy, each attack's the mean over its attacked sets",
                "worst_copy": "robust: an image counts as far as it survives every attacked copy"}


def _report(cfg: FitReweightConfig, res: FitResult, budgets: Dict[str, str]) -> str:
    """report.md: the threat model, the rounds, the curves on the fit tables and on held-out images."""
    levels, rounds, on_tables, heldout, fit = res.levels, res.rounds, res.on_tables, res.heldout, res.fit
    attack_names = res.attack_names
    lines = ["# Learned reweight", "",
             f"Fitted on {fit.fit_x.shape[0]} clean training images{RESERVE_WORDS[cfg.split]} (and attacked "
             "copies of them); "
             f"{fit.hold_x.shape[0]} more are held out. Objective: robust + {cfg.fit.clean_weight:g} x clean "
             f"({ROBUST_WORDS[cfg.fit.robust]}).", "",
             "Trained against:", ""]
    lines += [f"- {name}: {b}" for name, b in budgets.items()]
    lines += [f"- round 0: {cfg.attacks[0].name} through DBP at t* = {', '.join(f'{t:g}' for t in levels)}"]
    lines += ["- capped: an attacked copy at t counts at most what the round-0 copy crafted against t leaves "
              "there"] if cfg.cap else []
    lines += ["", "| round | attacked sets | clean (tables) | robust (tables) |", "|---|---|---|---|"]
    lines += [f"| {r['round']} | {len(r['attacked_sets'])} | {100 * r['clean']:.1f} | {100 * r['robust']:.1f} |"
              for r in rounds]
    lines += ["", "On the fit images' tables (accuracy at each curve's t*" + (", capped" if cfg.cap else "")
              + "; each attack's accuracy, and each image's worst copy):", "",
              "| reweight | clean | robust | " + " | ".join(attack_names) + " | worst copy | mean t* clean | "
              "mean t* attacked |", "|---" * (len(attack_names) + 6) + "|"]
    lines += [f"| {n} | {100 * v['clean']:.1f} | {100 * v['robust']:.1f} | "
              + " | ".join(f"{100 * a:.1f}" for a in v["per_attack"])
              + f" | {100 * v['worst_copy']:.1f} | {v['mean_t_clean']:.3f} | {v['mean_t_attacked']:.3f} |"
              for n, v in on_tables.items()]
    if heldout:
        labels = list(next(iter(heldout.values())))
        lines += ["", f"Held-out images ({fit.hold_x.shape[0]}), each attack run through each defense, "
                  f"{cfg.verify_draws} draws: expected / worst-of-{cfg.verify_draws} accuracy % [95% interval]:", "",
                  "| reweight | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for n, res in heldout.items():
            lines.append(f"| {n} | " + " | ".join(f"{_pct(res[a], 'expected')} / {_pct(res[a], 'worst_of_n')}"
                                                  for a in labels) + " |")
    return "\n".join(lines) + "\n"

