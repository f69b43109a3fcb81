"""tools/ts_study.py: the paired bootstrap, the verdict rule, the crops, and an end-to-end smoke run."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ssni.noise import NOISE_SAMPLERS
from ssni.typical import TypicalSetNoise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("ts_study", ROOT / "tools" / "ts_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ts_study"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("ts_study", None)


# ---- paired bootstrap -----------------------------------------------------------------------

def test_bootstrap_constant_difference_is_a_zero_width_interval(study):
    g = torch.Generator().manual_seed(0)
    base = 20 + 5 * torch.randn(30, generator=g, dtype=torch.float64)  # crops differ a lot ...
    ci = study.paired_bootstrap_ci(base + 0.25, base, resamples=500)
    # ... but the pairing cancels them: every resample has the same mean difference
    assert ci["mean"] == pytest.approx(0.25, abs=1e-12)
    assert ci["lo"] == ci["hi"] == ci["mean"] and ci["n"] == 30
    same = study.paired_bootstrap_ci(base, base)
    assert same == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 30}


def test_bootstrap_interval_contains_the_mean_and_shrinks(study):
    g = torch.Generator().manual_seed(1)
    widths = []
    for n in (20, 80, 320):
        d = 0.3 + torch.randn(n, generator=g, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
        ci = study.paired_bootstrap_ci(b + d, b, resamples=2000, seed=3)
        assert ci["lo"] < ci["mean"] < ci["hi"]
        assert ci["mean"] == pytest.approx(d.mean().item(), abs=1e-12)
        width = ci["hi"] - ci["lo"]
        # the percentile interval is close to the normal one, 2 * 1.96 * sd / sqrt(n)
        assert width == pytest.approx(2 * 1.96 * d.std().item() / math.sqrt(n), rel=0.2)
        widths.append(width)
    assert widths[0] > widths[1] > widths[2]
    # seeded: the same call gives the same interval, another seed another one
    d = torch.randn(40, generator=g, dtype=torch.float64)
    a = study.paired_bootstrap_ci(d, torch.zeros(40), seed=5)
    assert a == study.paired_bootstrap_ci(d, torch.zeros(40), seed=5)
    assert a != study.paired_bootstrap_ci(d, torch.zeros(40), seed=6)


def test_bootstrap_bad_input(study):
    with pytest.raises(ValueError, match="one length"):
        study.paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one pair"):
        study.paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="NaN"):
        study.paired_bootstrap_ci([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="resamples"):
        study.paired_bootstrap_ci([1.0], [1.0], resamples=0)


# ---- verdict, plateau, settings, crops --------------------------------------------------------

def _ci(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi, "n": 16}


def test_best_setting_rule(study):
    zero = _ci(0.0, 0.0, 0.0)
    diffs = {"gaussian": {"clean": zero, "linf-4": zero, "transfer": zero},
             # the largest gain, but a clean cost beyond its interval: not eligible
             "costly": {"clean": _ci(-0.5, -0.7, -0.3), "linf-4": _ci(2.0, 1.5, 2.5), "transfer": zero},
             "good": {"clean": _ci(-0.05, -0.2, 0.1), "linf-4": _ci(0.4, 0.1, 0.7), "transfer": _ci(0.2, -0.1, 0.5)},
             "better": {"clean": _ci(0.0, -0.1, 0.1), "linf-4": _ci(0.1, -0.2, 0.4), "transfer": _ci(0.6, 0.2, 1.0)}}
    best = study.best_setting(diffs, ["linf-4", "transfer"])
    assert (best["setting"], best["metric"]) == ("better", "transfer")
    assert best["per_metric"] == {"linf-4": "good", "transfer": "better"}
    assert "better" in best["text"] and "+0.60 dB under transfer" in best["text"]
    none = study.best_setting({"gaussian": diffs["gaussian"], "costly": diffs["costly"]}, ["linf-4"])
    assert none["setting"] is None and none["text"] == "no setting helps beyond the interval"


def test_plateau_summary(study):
    p = study.plateau([(100, 20.0), (200, 21.0), (300, 21.5), (400, 21.6)])
    assert p["final"] == 21.6 and p["best"] == 21.6 and p["final_minus_best"] == 0.0
    assert p["last_gain"] == pytest.approx(0.1) and p["from_step"] == 300
    assert p["last_quarter_gain"] == pytest.approx(0.1)
    q = study.plateau([(10, 20.0), (20, 21.0), (30, 20.8), (40, 20.7)])
    assert q["final_minus_best"] == pytest.approx(-0.3) and q["last_quarter_gain"] == pytest.approx(-0.1)
    assert study.plateau([])["final"] is None
    assert study.plateau([(5, 20.0)])["last_quarter_gain"] is None


def test_settings_are_one_factor_variations_that_build(study):
    assert study.SETTINGS["gaussian"].noise_kwargs() is None
    default = study.SETTINGS["ts"].noise_kwargs()
    assert default == study.TS_DEFAULT
    for name, st in study.SETTINGS.items():
        kw = st.noise_kwargs()
        if kw is None:
            continue
        changed = {k for k in kw if kw[k] != default[k]}
        assert len(changed) <= 1, (name, changed)  # one factor at a time around the default
        ts = NOISE_SAMPLERS.create("typical_set", **kw)
        assert isinstance(ts, TypicalSetNoise)
        n = ts((8, 1, 40, 40), torch.Generator().manual_seed(0), "cpu")
        assert n.shape == (8, 1, 40, 40) and torch.isfinite(n).all()
    axes = {tuple(st.noise_kwargs()[k]) if isinstance(st.noise_kwargs()[k], list) else st.noise_kwargs()[k]
            for st in study.SETTINGS.values() if st.ts for k in st.ts}
    for value in (0.25, 1.0, (1.02, 1.10), (1.2, 2.0), 0.5, "sign", "lowfreq"):
        assert value in axes


def test_test_crops_are_disjoint_and_checked(study):
    x, v, names = study.test_crops(32, 20, 6, seed=0)
    assert x.shape == (20, 1, 32, 32) and v.shape == (6, 1, 32, 32) and len(set(names)) == 20
    # round robin: every test photo contributes evaluation crops
    assert {n.split("#")[0] for n in names} == set(study.PHOTO_TEST)
    flat = torch.cat([x, v]).flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(26) * 1e9).min() > 0  # no crop used twice
    x2, _, _ = study.test_crops(32, 20, 6, seed=0)
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="crops"):
        study.test_crops(64, 70, 20, seed=0)  # 5 photos x 16 crops of 64 px
    with pytest.raises(ValueError, match="crop size"):
        study.test_crops(400, 1, 1, seed=0)


def test_bad_arguments_exit_with_one_line(study, capsys):
    with pytest.raises(SystemExit) as e:
        study.parse_args(["--settings", "gaussian,nope"])
    assert e.value.code == 2 and "unknown setting(s) nope; valid choices: gaussian, ts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse_args(["--models", "resnet"])
    args = study.parse_args(["--quick", "--settings", "ts", "--steps", "7"])
    assert args.settings == ["gaussian", "ts"] and args.steps == 7 and args.crops == 4 and args.eval_every == 1


# ---- end to end ----------------------------------------------------------------------------

def test_study_end_to_end_and_resume(study, tmp_path):
    out = tmp_path / "study"
    argv = ["--quick", "--settings", "gaussian,ts_far", "--models", "small", "--steps", "3", "--crops", "3",
            "--val-crops", "2", "--attack-steps", "1", "--resamples", "100", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert study.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "diff.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    ev = res["eval"]["small"]
    assert list(ev["settings"]) == ["gaussian", "ts_far"]
    assert ev["metrics"] == ["clean", "linf-2", "linf-4", "l2-4-zm", "transfer"]
    for m in ev["metrics"]:  # the baseline against itself: exactly 0, a degenerate interval
        assert ev["settings"]["gaussian"]["diff"][m] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 3}
        d = ev["settings"]["ts_far"]["diff"][m]
        assert d["lo"] <= d["mean"] <= d["hi"] and len(ev["settings"]["ts_far"]["per_crop"][m]) == 3
    assert "dncnn5/gaussian" in ev["transfer_source"]
    assert ev["best"]["text"] in report
    for s in ("gaussian", "ts_far"):
        assert f"| {s} | " in report
        run = res["runs"]["small"][s]
        assert run["trained_now"] == 3 and [p[0] for p in run["curve"]] == [1, 2, 3]
    assert res["runs"]["small"]["ts_far"]["noise_kwargs"]["outer_range"] == [1.2, 2.0]
    assert res["runs"]["dncnn5"]["gaussian"]["trained_now"] == 3  # the transfer source

    # a rerun retrains nothing and reads the evaluations from the cache
    ckpts = sorted((out / "train").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    cache = sorted((out / "eval" / "cache").iterdir())
    assert study.main(argv) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert all(r["trained_now"] == 0 for rs in res2["runs"].values() for r in rs.values())
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps and sorted((out / "eval" / "cache").iterdir()) == cache
    assert res2["eval"] == res["eval"]

    # a run killed after step 2 resumes: only the missing step is trained, to the same weights
    run_dir = Path(res["runs"]["small"]["ts_far"]["run_dir"])
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step_00000002"}))
    assert study.main(argv) == 0
    res3 = json.loads((out / "results.json").read_text())
    assert res3["runs"]["small"]["ts_far"]["trained_now"] == 1
    assert res3["runs"]["small"]["gaussian"]["trained_now"] == 0
    assert res3["runs"]["small"]["ts_far"]["weights"] == res["runs"]["small"]["ts_far"]["weights"]
    assert res3["eval"] == res["eval"]
