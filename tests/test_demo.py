"""The whole `ssni demo` pipeline at toy sizes (8x8 digits, a few steps per stage)."""
import json

from ssni.cli import main

ATTACK = "{name: pgd-eot, attack: pgd, eot: 2, view: full, kwargs: {eps: 0.1, steps: 1, step_size: 0.05}}"
APGD = "{name: apgd-margin, attack: apgd, eot: 2, view: full, kwargs: {eps: 0.1, steps: 1, loss: margin}}"
ADAPTIVE = ("{name: ssni-adaptive, attack: pgd, eot: 2, view: adaptive, only_sample_specific: true, "
            "kwargs: {eps: 0.1, steps: 1, step_size: 0.05}}")


def test_demo_runs_every_stage_then_reuses_its_cache(tmp_path, capsys):
    small = "data.image_size=8"
    args = [
        "demo", f"run_dir={tmp_path / 'demo'}", "progress=false",
        f"score_overrides=[model.name=unet_tiny, {small}, loop.steps=3, sample_count=4, sample_steps=3, loop.device=cpu]",
        f"classifier_overrides=[model.name=resnet10t, {small}, loop.steps=40, loop.device=cpu]",
        f"calibrate_overrides=[{small}, count=16, score_norm.timesteps=4, device=cpu]",
        "defense_overrides=[score_norm.timesteps=4, purifier.sampler=ddpm, purifier.steps=2, device=cpu]",
        f"reweight_overrides=[{small}, count=12, holdout=0, attacks.0.kwargs.steps=1, "
        "attacks.1.kwargs.steps=1, 't_grid=[0.0, 0.1, 0.2]', fit.t_max=0.2, fit.steps=10, fit.restarts=1, "
        "batch_size=12, device=cpu]",
        f"evaluate_overrides=[{small}, num_samples=4, batch_size=4, draws=6, device=cpu, "
        f"'attacks=[{ATTACK}, {ADAPTIVE}, {APGD}]', sweep.attack=null]",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| ssni-learned | ssni-adaptive |" in out and "| none | pgd-eot |" in out
    # under the table: the budget, what the learned reweight was trained against, and what this is
    assert "Attack budget: 4 images, 6 defense draws each; pgd-eot: pgd 1 iterations, EOT 2" in out
    assert "ssni-learned: fitted on clean training images that the networks were not trained on, first " \
           "attacked through DBP at t* = 0, 0.1, 0.2, then against pgd-eot (pgd ce, 1 it, EOT 2, through " in out
    assert "; an attacked copy counted at each t* at most as the attack aimed at that t* allows; robust = the " \
           "worst attack's accuracy; objective robust + 2 * clean." in out
    assert "CPU-sized check" in out
    assert "At 4 images one image is 25.0 points: rows whose 95% intervals overlap are not different" in out
    # every defense's worst over its attacks through its own purifier, with worst-of-4 beside worst-of-6
    for name in ("dbp", "ssni-l", "ssni-n", "ssni-learned"):
        assert f"| {name} | worst-case |" in out
    assert "worst-of-4" in out and "worst-of-6" in out
    summary = json.loads((tmp_path / "demo/demo_summary.json").read_text())
    assert not any(s.get("cached") for s in summary["stages"].values())
    first = summary["stages"]
    report = (tmp_path / "demo/report.md").read_text()
    for name in ("none", "dbp", "ssni-l", "ssni-n", "ssni-learned"):
        assert f"| {name} |" in report
    # a second run reuses every stage (the fit its attacked sets) and the evaluation state
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo/demo_summary.json").read_text())
    assert all(s.get("cached") for s in summary["stages"].values()), summary  # the evaluation's batches too
    # the report keeps the seconds each stage took when it was computed, and says it was reused
    assert all(s["seconds"] == first[k]["seconds"] for k, s in summary["stages"].items())
    report = (tmp_path / "demo/report.md").read_text()
    assert f"| score network | {first['score network']['seconds']:.0f} | yes |" in report
    # a trained stage made with another config is not reused: the demo says what changed, trains nothing
    capsys.readouterr()
    changed = [a.replace("loop.steps=40,", "loop.steps=40, data.reserve=100,") for a in args]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "demo/classifier holds a run made with another config (data.reserve: 384 -> 100)" in err
    assert json.loads((tmp_path / "demo/classifier/summary.json").read_text())["steps"] == 40


def test_demo_checks_every_stage_override_before_training(tmp_path, capsys):
    """A misspelt override of a late stage fails at once, before any network is trained."""
    cases = [("evaluate_overrides=[num_sample=8]", "'num_sample'"),
             ("reweight_overrides=[fit.stepz=3]", "'fit.stepz'"),
             ("defense_overrides=[purifier.sampler=ddpm, purifier.dt=0.1]", "dt"),
             ("calibrate_overrides=[countt=3]", "'countt'")]
    for override, named in cases:
        run_dir = tmp_path / "demo"
        assert main(["demo", f"run_dir={run_dir}", "progress=false", override]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith("ssni demo: error:") and named in err, (override, err)
        assert not (run_dir / "score").exists(), override
