"""Several processes (torchrun, gloo on CPU) give the results of one process: calibrate, train-denoiser,
fit-reweight.

Run as a script, this file is the worker that torchrun starts (the commands one after the other in one
process, as `ssni demo` runs its stages):
    python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_more.py SETUP_DIR OUT_DIR COMMAND...
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from ssni.seeding import seeded

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import launch_and_wait  # noqa: E402

REWEIGHT_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "reweight" / "digits.yaml")
# the commands of each 2-process launch: calibrate and fit-reweight share one (one process group for both)
LAUNCHES = [["calibrate", "fit-reweight"], ["train-denoiser"]]


def _commands(setup: Path, out: Path) -> Dict[str, List[str]]:
    """The ssni command lines of the three runs, writing under `out`."""
    return {
        "calibrate": ["calibrate", f"output={out / 'cal'}", f"score_model={setup / 'score'}",
                      "score_weights=model", "data.image_size=8", "count=32", "batch_size=6",
                      "score_norm.timesteps=2", "plot_noise_std=[0.1]", "progress=false", "device=cpu"],
        "train-denoiser": ["train-denoiser", f"run_dir={out / 'den'}", "data.image_size=32",
                           "model.name=dncnn_tiny",
                           "model.kwargs.batch_norm=false", "patch_size=16", "loop.steps=4", "loop.batch_size=4",
                           "loop.progress=false", "loop.ckpt_every=0", "loop.device=cpu", "eval_batch=8"],
        "fit-reweight": ["fit-reweight", REWEIGHT_RECIPE, f"output={out / 'rw'}",
                         f"defense_recipe={setup / 'defense.yaml'}", "defense_overrides=[]", "data.image_size=8",
                         "count=10", "holdout=2", "alternations=1", "attacks.0.kwargs.steps=1",
                         "attacks.1.kwargs.steps=1", "t_grid=[0.0,0.05,0.2]", "fit.t_max=0.2", "fit.steps=20",
                         "fit.knots=4", "fit.restarts=1", "verify_draws=2", "batch_size=4", "progress=false",
                         "device=cpu"],
    }


def _worker(setup: Path, out: Path, names: List[str]) -> None:
    """The commands one after the other in this process (they share its process group)."""
    for name in names:
        _run_command(setup, out, name)


def _run_command(setup: Path, out: Path, name: str) -> None:
    """One command; this rank's result as OUT/NAME-rankR.json."""
    from ssni.commands import COMMANDS
    from ssni.config import load_config

    rank = int(os.environ["RANK"])
    argv = _commands(setup, out)[name]
    shares = []
    if name == "fit-reweight":  # record this rank's share of the clean images' tables
        from ssni.commands import fit_reweight

        measure = fit_reweight.Fit.measure

        def recorded(self, x, y, tag, first):
            if tag == "clean":
                shares.append(first)
            return measure(self, x, y, tag, first)

        fit_reweight.Fit.measure = recorded
    recipe = argv[1] if argv[1].endswith(".yaml") else None
    overrides = argv[2:] if recipe else argv[1:]
    res = COMMANDS.get(name)(load_config(COMMANDS.meta(name)["config"], recipe, overrides))
    if name == "fit-reweight":
        (out / f"fit-reweight-share{rank}.json").write_text(json.dumps(shares))
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(res, default=str))


# -- helpers of the tests ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SSNI_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A perturbed unet_tiny score model, its calibration, a resnet10t and a defense recipe (8x8 digits)."""
    import yaml

    from ssni.io import atomic_save_safetensors, atomic_write_json
    from ssni.models import classifier_spec, create_classifier, create_model, save_model
    from ssni.scoring import ScoreNormConfig, calibrate

    root = tmp_path_factory.mktemp("dist-more-setup")
    with seeded(0):
        sm = create_model("unet_tiny")
        with torch.no_grad():  # nudge the zero-initialised output layers so the score is not zero
            for p in sm.parameters():
                p.add_(0.02 * torch.randn_like(p))
        clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    save_model(root / "score", sm)
    cal, _ = calibrate(sm.eval(), torch.rand(16, 1, 8, 8), ScoreNormConfig(timesteps=3))
    cal.save(root / "calibration.json")
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    recipe = {"score_model": str(root / "score"), "score_weights": "model",
              "calibration": str(root / "calibration.json"), "score_norm": {"timesteps": 3},
              "purifier": {"sampler": "ddpm", "steps": 2},
              "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
              "mean": [0.0], "std": [1.0], "device": "cpu"}
    (root / "defense.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """The one-process runs (in this process, one thread as each worker) and one 2-process launch."""
    from ssni.cli import main

    out = tmp_path_factory.mktemp("dist-more")
    threads = torch.get_num_threads()
    old = os.environ.get("SSNI_THREADS")
    os.environ["SSNI_THREADS"] = "1"
    try:
        one = {name: main(argv) for name, argv in _commands(setup, out / "one").items()}
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("SSNI_THREADS")
        else:
            os.environ["SSNI_THREADS"] = old
    procs = {}
    for names in LAUNCHES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), __file__, str(setup), str(out / "two"), *names]
        proc = launch_and_wait(cmd, _env(), 150)
        procs.update({name: proc for name in names})
    return {"out": out, "one": one, "procs": procs}


def _ok(runs, name: str) -> None:
    proc = runs["procs"][name]
    assert runs["one"][name] == 0
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shard_starts_and_join_shards_restore_the_one_process_order():
    from ssni.scoring.calibration import join_shards, shard_starts

    n, bs = 23, 4
    for world in (1, 2, 3, 7):
        parts = [torch.cat([torch.arange(a, min(a + bs, n)) for a in shard_starts(n, bs, r, world)]
                           or [torch.zeros(0, dtype=torch.long)]) for r in range(world)]
        assert torch.equal(join_shards(parts, bs), torch.arange(n))
    with pytest.raises(ValueError, match="rank"):
        shard_starts(n, bs, 2, 2)


def test_two_process_calibration_equals_one_process(runs):
    _ok(runs, "calibrate")
    one = json.loads((runs["out"] / "one" / "cal" / "calibration.json").read_text())
    two = json.loads((runs["out"] / "two" / "cal" / "calibration.json").read_text())
    assert two["count"] == 32 and two == one  # fingerprint, mean, quantiles, histograms: all equal
    assert (runs["out"] / "two" / "cal" / "score_norms.png").stat().st_size > 1000


def test_two_process_train_denoiser_equals_one_process(runs):
    from ssni.models import load_model

    _ok(runs, "train-denoiser")
    for weights in ("model", "ema"):
        one = load_model(runs["out"] / "one" / "den", weights).state_dict()
        two = load_model(runs["out"] / "two" / "den", weights).state_dict()
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)
    summary = [json.loads((runs["out"] / k / "den" / "summary.json").read_text()) for k in ("one", "two")]
    assert summary[1]["steps"] == 4
    assert abs(summary[1]["final_loss"] - summary[0]["final_loss"]) <= 1e-3 * summary[0]["final_loss"]


def test_two_process_fit_reweight_shards_the_attacks_and_equals_one_process(runs):
    out = runs["out"]
    _ok(runs, "fit-reweight")
    one, two = (json.loads((out / k / "rw" / "reweight.json").read_text()) for k in ("one", "two"))
    assert two == one  # curve, rounds, tables and held-out check
    assert [len(r["attacked_sets"]) for r in one["rounds"]] == [3, 5]  # round 0 at every grid t, then the alternation
    ranks = [json.loads((out / "two" / f"fit-reweight-rank{r}.json").read_text()) for r in range(2)]
    assert "report" in ranks[0] and ranks[1]["rank"] == 1  # rank 1 used rank 0's curve and returned its paths
    assert ranks[1]["reweight"] == ranks[0]["reweight"] == str(out / "two" / "rw" / "reweight.json")
    # rank 1 did its share: its batches (every second one, batch_size=4, 8 fit images) were its own
    assert [json.loads((out / "two" / f"fit-reweight-share{r}.json").read_text()) for r in range(2)] == [[0], [4]]


def test_fit_reweight_tables_do_not_depend_on_the_batch(setup):
    """A sample's score norm and accuracy table are the same alone as in a batch."""
    from ssni.commands.fit_reweight import Fit, FitReweightConfig
    from ssni.config import load_config
    from ssni.training.dist import DistContext

    argv = _commands(setup, setup / "unused")["fit-reweight"]
    fit = Fit(load_config(FitReweightConfig, argv[1], argv[2:]), DistContext())
    x, y = fit.fit_x[:5], fit.fit_y[:5]
    whole = fit.measure(x, y, "clean", 0)
    parts = [fit.measure(x[i:i + 1], y[i:i + 1], "clean", i) for i in range(5)]
    for key in ("norm", "table"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key], msg=key)


def test_two_commands_in_one_launch_share_the_process_group(runs):
    """calibrate then fit-reweight in one 2-process launch (a second group after the first hung before)."""
    proc = runs["procs"]["fit-reweight"]
    assert proc is runs["procs"]["calibrate"] and proc.returncode == 0, proc.stderr[-3000:]
    for name in ("calibrate", "fit-reweight"):
        assert all((runs["out"] / "two" / f"{name}-rank{r}.json").is_file() for r in range(2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
