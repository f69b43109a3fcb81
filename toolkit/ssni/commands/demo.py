"""`ssni demo`: the whole pipeline on the embedded digits, on a CPU, with nothing downloaded.

Stages (each cached under run_dir and skipped when its output exists; evaluation resumes):
score network -> classifier -> calibration -> learned reweight -> evaluation of five defenses
(none, DBP, SSNI-L, SSNI-N, SSNI-learned) under full-gradient PGD-EOT and the SSNI-adaptive
attack through a cheap surrogate purifier -> optionally (strong_samples > 0) the strongest attack
that fits a budget (worst over full, adaptive and selective EOT through each sample-specific
defense's own purifier, on a subset) -> tables on the terminal with the attack budget, and
report.md with plots.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..config import from_dict, load_config, merge, parse_overrides, save_config, to_dict
from ..evaluate.report import markdown_table
from ..evaluate.runner import AttackSpec, EvaluateConfig, SweepConfig, expand_attacks
from ..io import atomic_write_json, atomic_write_text
from ..scoring import REWEIGHTS
from .calibrate import CalibrateConfig, run_calibrate
from .evaluate import run_evaluate
from .fit_reweight import FitReweightConfig, run_fit_reweight
from .registry import command
from .train_classifier import ClassifierTrainConfig, train_classifier
from .train_score import ScoreTrainConfig, train_score


@dataclass
class DemoConfig:
    """Recipes of every stage plus overrides; paths between stages are filled in by the demo."""

    run_dir: str = "runs/demo"
    score_recipe: str = "recipes/score/digits.yaml"
    score_overrides: List[str] = field(default_factory=list)
    classifier_recipe: str = "recipes/classifier/digits_resnet18.yaml"
    classifier_overrides: List[str] = field(default_factory=lambda: ["loop.steps=400"])
    calibrate_recipe: str = "recipes/calibrate/digits.yaml"
    calibrate_overrides: List[str] = field(  # 300 clean digits instead of all 1438
        default_factory=lambda: ["count=300", "plot_noise_std=[0.1]"])
    defense_recipe: str = "recipes/defense/digits.yaml"
    defense_overrides: List[str] = field(default_factory=list)  # for fit-reweight and evaluate
    reweight_recipe: str = "recipes/reweight/digits.yaml"
    reweight_overrides: List[str] = field(default_factory=lambda: [  # a smaller oracle search
        "count=64", "pgd_steps=10", "t_grid=[0.0, 0.02, 0.05, 0.1, 0.15, 0.3]"])
    evaluate_recipe: str = "recipes/eval/digits.yaml"
    # A CPU budget: 48 images, 4 defense draws each, 20-step DDPM as the defense, attacked through
    # a 5-step DDPM surrogate (named in every row), 6 PGD iterations with EOT 2 (the recipe: 10 with
    # EOT 4, through the defense's own purifier). draws=16 adds worst-of-4 beside worst-of-16.
    evaluate_overrides: List[str] = field(default_factory=lambda: [
        "num_samples=48", "sweep.eps=[0.0627, 0.25]", "sweep.num_samples=24",
        "attacks.0.kwargs.steps=6", "attacks.0.eot=2", "attacks.0.purifier=surrogate",
        "attacks.1.kwargs.steps=6", "attacks.1.eot=2", "attacks.1.purifier=surrogate",
        "defense_overrides=[purifier.sampler=ddpm, purifier.steps=20, attack_purifier.steps=5]"])
    # The strongest attack that fits the budget, for each sample-specific defense: the worst over
    # full, adaptive and selective PGD-EOT (the main attack's iterations and EOT) through the
    # defense's own purifier, on the first `strong_samples` images; 0 (the default, for time: it
    # costs about as much as the main evaluation again on 2 CPU cores) skips it.
    strong_samples: int = 0
    strong_overrides: List[str] = field(default_factory=list)  # on that evaluation's config
    progress: bool = True


def _stage(name: str, done: Path, run: Callable[[], Dict[str, Any]], log: Dict[str, Any]) -> None:
    t0 = time.perf_counter()
    if done.exists():
        print(f"[demo] {name}: cached ({done})", flush=True)
        log[name] = {"cached": True, "seconds": 0.0}
        return
    print(f"[demo] {name} ...", flush=True)
    out = run()
    log[name] = {"cached": False, "seconds": round(time.perf_counter() - t0, 1),
                 **{k: v for k, v in (out or {}).items() if isinstance(v, (int, float, str))}}
    print(f"[demo] {name}: done in {log[name]['seconds']:.0f} s", flush=True)


@command("demo", DemoConfig, "the whole pipeline on embedded digits: train, calibrate, fit, evaluate")
def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run (or reuse) every stage and evaluate; returns the table and the report path."""
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root, "demo_config.yaml")
    score, clf, cal, rw, ev = (root / "score", root / "classifier", root / "calibration",
                               root / "reweight", root / "eval")
    progress = str(cfg.progress).lower()
    prog = [f"loop.progress={progress}"]
    links = [f"score_model={score}", f"calibration={cal / 'calibration.json'}",
             f"classifier.checkpoint={clf}"] + list(cfg.defense_overrides)
    log: Dict[str, Any] = {}
    t_start = time.perf_counter()

    _stage("score network", score / "summary.json", lambda: train_score(load_config(
        ScoreTrainConfig, cfg.score_recipe, cfg.score_overrides + prog + [f"run_dir={score}"])), log)
    _stage("classifier", clf / "summary.json", lambda: train_classifier(load_config(
        ClassifierTrainConfig, cfg.classifier_recipe,
        cfg.classifier_overrides + prog + [f"run_dir={clf}"])), log)
    _stage("calibration", cal / "calibration.json", lambda: run_calibrate(load_config(
        CalibrateConfig, cfg.calibrate_recipe, cfg.calibrate_overrides + [
            f"output={cal}", f"score_model={score}", f"progress={progress}"])),
        log)
    _stage("learned reweight", rw / "reweight.json", lambda: _fit_reweight(cfg, rw, links), log)

    ev_cfg = load_config(EvaluateConfig, cfg.evaluate_recipe, cfg.evaluate_overrides + [
        f"run_dir={ev}", f"defense_recipe={cfg.defense_recipe}", f"progress={progress}"])
    ev_cfg.defense_overrides = list(ev_cfg.defense_overrides) + links
    for d in ev_cfg.defenses:
        if d.reweight is not None and d.reweight.name == "learned":
            d.reweight.kwargs = {**d.reweight.kwargs, "path": str(rw / "reweight.json")}
    t0 = time.perf_counter()
    print("[demo] evaluation ...", flush=True)
    result = run_evaluate(ev_cfg)
    log["evaluation"] = {"seconds": round(time.perf_counter() - t0, 1)}
    strong_cfg = strong_config(ev_cfg, cfg.strong_samples, root / "eval-strong", cfg.strong_overrides)
    strong_rows: List[Dict[str, Any]] = []
    flags = list(result["flags"])
    if strong_cfg is not None:
        t0 = time.perf_counter()
        print(f"[demo] strongest attack ({strong_cfg.num_samples} images, own purifier) ...", flush=True)
        strong = run_evaluate(strong_cfg)
        log["strongest attack"] = {"seconds": round(time.perf_counter() - t0, 1)}
        strong_rows = json.loads(Path(strong["results"]).read_text())["worst_case"]
        flags += [f"strongest: {f}" for f in strong["flags"]]
    total = time.perf_counter() - t_start
    footer = _footer(ev_cfg, strong_cfg, strong_rows)
    print(footer, flush=True)
    report = _write_report(root, ev, log, total, footer)
    atomic_write_json(root / "demo_summary.json", {"stages": log, "seconds": round(total, 1),
                                                   "report": str(report), "flags": flags,
                                                   "strongest": strong_rows})
    return {"report": str(report), "seconds": round(total, 1), "flags": flags}


def strong_config(ev_cfg: EvaluateConfig, samples: int, run_dir: Path,
                  overrides: Sequence[str] = ()) -> Optional[EvaluateConfig]:
    """The demo's strongest-attack evaluation: every sample-specific defense of `ev_cfg` under full,
    adaptive and selective PGD-EOT (the main full-view attack's settings) through its own purifier,
    on the first `samples` images, with a worst-over-the-three row; None when there is nothing to do."""
    defenses = [d for d in ev_cfg.defenses
                if d.reweight is not None and REWEIGHTS.get(d.reweight.name).sample_specific]
    main = next((a for a in expand_attacks(ev_cfg.attacks)[0] if a.view == "full" and not a.fixed_seeds), None)
    if samples <= 0 or not defenses or main is None:
        return None
    cfg = copy.deepcopy(ev_cfg)
    cfg.run_dir, cfg.defenses, cfg.sweep = str(run_dir), defenses, SweepConfig()
    cfg.num_samples = min(samples, ev_cfg.num_samples)
    cfg.batch_size = min(cfg.batch_size, cfg.num_samples)
    same = dict(attack=main.attack, kwargs=dict(main.kwargs), eot=main.eot, purifier="defense")
    cfg.attacks = [AttackSpec(name="full-own", view="full", **same),
                   AttackSpec(name="adaptive-own", view="adaptive", **same),
                   AttackSpec(name="selective-own", view="full", selective=True, **same)]
    if overrides:
        cfg = from_dict(EvaluateConfig, merge(to_dict(cfg), parse_overrides(overrides)), "strong_overrides")
    return cfg


def _footer(ev_cfg: EvaluateConfig, strong_cfg: Optional[EvaluateConfig],
            strong_rows: List[Dict[str, Any]]) -> str:
    """What the demo's numbers are: the attack budget, and that this is a CPU-sized check."""
    attacks = expand_attacks(ev_cfg.attacks)[0]
    lines = ["", f"Attack budget: {ev_cfg.num_samples} images, {ev_cfg.draws} defense draws each; "
             + "; ".join(f"{a.name}: {a.attack} {a.kwargs.get('steps', '?')} iterations, EOT {a.eot}, "
                         f"through the {a.purifier} purifier" for a in attacks) + "."]
    if strong_rows:
        lines += ["", f"Strongest attack that fits the budget ({strong_cfg.num_samples} images, "
                  f"{strong_cfg.draws} draws; worst over full, adaptive and selective EOT through each "
                  "defense's own purifier):", "", markdown_table(strong_rows)]
    else:
        lines.append("Not run: the strongest attack through each defense's own purifier "
                     "(`ssni demo strong_samples=16`).")
    lines.append("This is a CPU-sized check of the pipeline with weak, cheap attacks, not a robustness "
                 "result: stronger attacks (more iterations, EOT and draws; recipes/eval/digits.yaml) "
                 "lower these numbers.")
    return "\n".join(lines)


def _fit_reweight(cfg: DemoConfig, out: Path, links: List[str]) -> Dict[str, Any]:
    fit_cfg = load_config(FitReweightConfig, cfg.reweight_recipe, cfg.reweight_overrides + [
        f"output={out}", f"defense_recipe={cfg.defense_recipe}",
        f"progress={str(cfg.progress).lower()}"])
    fit_cfg.defense_overrides = list(fit_cfg.defense_overrides) + links
    return run_fit_reweight(fit_cfg)


def _write_report(root: Path, ev: Path, log: Dict[str, Any], total: float, footer: str = "") -> Path:
    """report.md at the demo root: stage summary, the evaluation report, plots copied beside."""
    body = (ev / "report.md").read_text()
    for png in ev.glob("*.png"):
        shutil.copyfile(png, root / png.name)
    for sub in ("calibration", "reweight", "score"):
        for png in (root / sub).glob("*.png"):
            shutil.copyfile(png, root / f"{sub}_{png.name}")
    lines = ["# ssni demo on digits", "",
             f"Total time: {total:.0f} s (cached stages take no time).", "",
             "| stage | seconds | cached |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('seconds', 0):.0f} | {v.get('cached', False)} |" for k, v in log.items()]
    lines += ["", body.replace("# Evaluation report", "## Evaluation"), footer, "",
              "## Other figures", "", "![samples](score_samples.png)",
              "![calibration](calibration_score_norms.png)", "![reweight](reweight_reweight.png)"]
    return atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
