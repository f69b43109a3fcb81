"""`ssni demo`: the whole pipeline on the embedded digits, on a CPU, with nothing downloaded.

Stages (each cached under run_dir and skipped when its output exists; evaluation resumes):
score network -> classifier -> calibration -> learned reweight (fitted against the evaluation's
full and adaptive PGD-EOT through the defense) -> evaluation of five defenses (none, DBP, SSNI-L,
SSNI-N, SSNI-learned) under full-gradient PGD-EOT, the SSNI-adaptive attack and APGD-margin, all
through each defense's own purifier, with a worst-over-attacks row per defense -> tables on the
terminal with the attack budget, and report.md with plots.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

from ..config import check_same_run, load_config, save_config, setting
from ..defense import DefenseConfig
from ..evaluate.runner import EvaluateConfig, expand_attacks
from ..io import atomic_write_json, atomic_write_text
from .calibrate import CalibrateConfig, run_calibrate
from .evaluate import run_evaluate
from .fit_reweight import FitReweightConfig, run_fit_reweight
from .registry import command
from .train_classifier import ClassifierTrainConfig, train_classifier
from .train_score import ScoreTrainConfig, train_score


@dataclass
class DemoConfig:
    """Recipes of every stage plus overrides; paths between stages are filled in by the demo."""

    run_dir: str = setting("runs/demo", directory=True)
    score_recipe: str = "recipes/score/digits.yaml"
    score_overrides: List[str] = field(default_factory=list)
    classifier_recipe: str = "recipes/classifier/digits_resnet18.yaml"
    classifier_overrides: List[str] = field(default_factory=lambda: ["loop.steps=400"])
    calibrate_recipe: str = "recipes/calibrate/digits.yaml"
    calibrate_overrides: List[str] = field(  # 300 clean digits instead of all 1438
        default_factory=lambda: ["count=300", "plot_noise_std=[0.1]", "score_norm.timesteps=5"])
    defense_recipe: str = "recipes/defense/digits.yaml"
    # for fit-reweight and evaluate, for time: a 5-step DDPM purifies (the defense and what attacks
    # differentiate) and the score norm averages 5 time steps, not 20 (the calibration matches it)
    defense_overrides: List[str] = field(default_factory=lambda: [
        "purifier.sampler=ddpm", "purifier.steps=5", "score_norm.timesteps=5"])
    reweight_recipe: str = "recipes/reweight/digits.yaml"
    # A smaller fit: 64 images, round 0 through DBP at each t* of a 5-point grid (the cap's
    # diagonal), one alternation, against the evaluation's attacks (6 iterations, EOT 2); no
    # held-out check (the evaluation is that check).
    reweight_overrides: List[str] = field(default_factory=lambda: [
        "count=64", "holdout=0", "t_grid=[0.0,0.05,0.1,0.15,0.2]", "attacks.0.kwargs.steps=6",
        "attacks.1.kwargs.steps=6"])
    evaluate_recipe: str = "recipes/eval/digits_demo.yaml"
    evaluate_overrides: List[str] = field(default_factory=list)
    progress: bool = True


def _stage(name: str, done: Path, run: Callable[[], Dict[str, Any]], log: Dict[str, Any]) -> None:
    t0 = time.perf_counter()
    if done.exists():
        print(f"[demo] {name}: reused ({done})", flush=True)
        log[name] = {"cached": True, "seconds": None}
        return
    print(f"[demo] {name} ...", flush=True)
    out = run()
    log[name] = {"cached": False, "seconds": round(time.perf_counter() - t0, 1),
                 **{k: v for k, v in (out or {}).items() if isinstance(v, (int, float, str))}}
    print(f"[demo] {name}: done in {log[name]['seconds']:.0f} s", flush=True)


def _keep_first_timings(log: Dict[str, Any], root: Path) -> None:
    """A reused stage keeps the seconds it took when it was computed (from the last summary)."""
    path = root / "demo_summary.json"
    before = json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}
    for name, entry in log.items():
        if entry.get("cached") and name in before:
            entry["seconds"] = before[name].get("seconds")


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

    score_cfg = load_config(ScoreTrainConfig, cfg.score_recipe, cfg.score_overrides + prog + [f"run_dir={score}"])
    clf_cfg = load_config(ClassifierTrainConfig, cfg.classifier_recipe,
                          cfg.classifier_overrides + prog + [f"run_dir={clf}"])
    cal_cfg = load_config(CalibrateConfig, cfg.calibrate_recipe, cfg.calibrate_overrides + [
        f"output={cal}", f"score_model={score}", f"progress={progress}"])
    # every stage's config (and the defense recipe with its overrides) is built now, so a misspelt
    # override fails before an hour of training instead of when its stage starts
    fit_cfg = _fit_config(cfg, rw, links)
    ev_cfg = _evaluate_config(cfg, ev, rw, links)
    load_config(DefenseConfig, cfg.defense_recipe, list(cfg.defense_overrides) + links)
    stages = [("score network", score, "summary.json", score_cfg, train_score),
              ("classifier", clf, "summary.json", clf_cfg, train_classifier),
              ("calibration", cal, "calibration.json", cal_cfg, run_calibrate)]
    # a finished stage is reused only if it was made with the config it would run with now (all
    # checked before any trains)
    for _, d, done, c, _ in stages:
        check_same_run(c, d, done)
    for name, d, done, c, run in stages:
        _stage(name, d / done, lambda: run(c), log)  # called at once, inside the loop
    # always run: fit-reweight reuses its attacked sets when their inputs are unchanged (content keys)
    t0 = time.perf_counter()
    print("[demo] learned reweight ...", flush=True)
    fitted = run_fit_reweight(fit_cfg)
    log["learned reweight"] = {"cached": fitted["computed"] == 0, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[demo] learned reweight: done in {log['learned reweight']['seconds']:.0f} s "
          f"({fitted['computed']} attacked sets computed)", flush=True)

    t0 = time.perf_counter()
    print("[demo] evaluation ...", flush=True)
    result = run_evaluate(ev_cfg)
    log["evaluation"] = {"cached": result.get("computed_batches") == 0,
                         "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[demo] evaluation: done in {log['evaluation']['seconds']:.0f} s", flush=True)
    flags = list(result["flags"])
    total = time.perf_counter() - t_start
    _keep_first_timings(log, root)
    footer = _footer(ev_cfg, json.loads((rw / "reweight.json").read_text()))
    print(footer, flush=True)
    report = _write_report(root, ev, log, total, footer)
    atomic_write_json(root / "demo_summary.json", {"stages": log, "seconds": round(total, 1),
                                                   "report": str(report), "flags": flags})
    return {"report": str(report), "seconds": round(total, 1), "flags": flags}


def _footer(ev_cfg: EvaluateConfig, fitted: Dict[str, Any]) -> str:
    """What the demo's numbers are: the attack budget, what the learned reweight was trained against
    (fitted: its reweight.json), and that this is a CPU-sized check."""
    trained_against = fitted.get("trained_against", {})
    levels = ", ".join(f"{t:g}" for t in fitted.get("start_t", []))
    attacks = expand_attacks(ev_cfg.attacks)[0]
    lines = ["", f"Attack budget: {ev_cfg.num_samples} images, {ev_cfg.draws} defense draws each; "
             + "; ".join(f"{a.name}: {a.attack} {a.kwargs.get('steps', '?')} iterations, EOT {a.eot}, "
                         f"through the {a.purifier} purifier" for a in attacks) + ". "
             "worst-case: per image, the worst over these attacks (strongest that fits the budget).",
             "ssni-learned: fitted on clean training images"
             + (" that the networks were not trained on" if fitted.get("split") == "reserve" else "")
             + (f", first attacked through DBP at t* = {levels}" if levels else "") + ", then against "
             + "; ".join(f"{k} ({v})" for k, v in trained_against.items())
             + ("; an attacked copy counted at each t* at most as the attack aimed at that t* allows"
                if fitted.get("capped") else "")
             + ("; robust = the worst attack's accuracy" if fitted.get("robust_over") == "per_attack" else "")
             + (f"; objective {fitted['objective']}" if "objective" in fitted else "") + ".",
             "This is a CPU-sized check of the pipeline with cheap attacks, not a robustness result: stronger "
             "attacks (more iterations, EOT and draws; recipes/eval/digits.yaml) lower these numbers.",
             f"At {ev_cfg.num_samples} images one image is {100 / max(1, ev_cfg.num_samples):.1f} points: rows "
             "whose 95% intervals overlap are not different, whatever their order."]
    return "\n".join(lines)


def _fit_config(cfg: DemoConfig, out: Path, links: List[str]) -> FitReweightConfig:
    """The learned-reweight stage's config: the reweight recipe + the demo's overrides and links."""
    fit_cfg = load_config(FitReweightConfig, cfg.reweight_recipe, cfg.reweight_overrides + [
        f"output={out}", f"defense_recipe={cfg.defense_recipe}",
        f"progress={str(cfg.progress).lower()}"])
    fit_cfg.defense_overrides = list(fit_cfg.defense_overrides) + links
    load_config(DefenseConfig, fit_cfg.defense_recipe, fit_cfg.defense_overrides)  # checked now
    return fit_cfg


def _evaluate_config(cfg: DemoConfig, ev: Path, rw: Path, links: List[str]) -> EvaluateConfig:
    """The evaluation stage's config, its learned defense pointed at the demo's own reweight."""
    ev_cfg = load_config(EvaluateConfig, cfg.evaluate_recipe, cfg.evaluate_overrides + [
        f"run_dir={ev}", f"defense_recipe={cfg.defense_recipe}", f"progress={str(cfg.progress).lower()}"])
    ev_cfg.defense_overrides = list(ev_cfg.defense_overrides) + links
    load_config(DefenseConfig, ev_cfg.defense_recipe, ev_cfg.defense_overrides)  # checked now
    for d in ev_cfg.defenses:
        if d.reweight is not None and d.reweight.name == "learned":
            d.reweight.kwargs = {**d.reweight.kwargs, "path": str(rw / "reweight.json")}
    return ev_cfg


def _seconds(value: Any) -> str:
    """A stage's seconds for the report ('?' when no earlier run recorded them)."""
    return "?" if value is None else f"{value:.0f}"


def _write_report(root: Path, ev: Path, log: Dict[str, Any], total: float, footer: str = "") -> Path:
    """report.md at the demo root: stage summary, the evaluation report, plots copied beside."""
    body = (ev / "report.md").read_text()
    for png in ev.glob("*.png"):
        shutil.copyfile(png, root / png.name)
    for sub in ("calibration", "reweight", "score"):
        for png in (root / sub).glob("*.png"):
            shutil.copyfile(png, root / f"{sub}_{png.name}")
    computed = sum(v["seconds"] or 0 for v in log.values() if not v.get("cached"))
    lines = ["# ssni demo on digits", "",
             f"This call: {total:.0f} s, of which {computed:.0f} s computing stages; a reused stage shows the "
             "seconds it took when it was computed.", "",
             "| stage | seconds when computed | reused this call |", "|---|---|---|"]
    lines += [f"| {k} | {_seconds(v.get('seconds'))} | {'yes' if v.get('cached') else 'no'} |"
              for k, v in log.items()]
    lines += ["", body.replace("# Evaluation report", "## Evaluation"), footer, "",
              "## Other figures", "", "![samples](score_samples.png)",
              "![calibration](calibration_score_norms.png)", "![reweight](reweight_reweight.png)"]
    return atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
