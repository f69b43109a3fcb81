"""Several processes (torchrun, gloo on CPU) give the results of one process: training and evaluation.

Run as a script, this file is the worker that torchrun starts:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py OUT_DIR a|b
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssni.models import create_model
from ssni.seeding import seeded
from ssni.training import DSMLoss, LoopConfig, OptimConfig, Trainer
from ssni.training.dist import DistContext
from ssni.training.loop import EpochBatches

STEPS, BATCH = 5, 8


class TinyImages:
    """32 random 8x8 images with labels (the fast path of the Trainer: .images / .labels)."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(7)
        self.images = torch.rand(n, 1, 8, 8, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return self.images.shape[0]


def _trainer(run_dir: Path, dist: DistContext | None = None) -> Trainer:
    with seeded(3):
        model = create_model("unet_tiny")
    loop = LoopConfig(steps=STEPS, batch_size=BATCH, seed=1, ema_decay=0.9, log_every=100, ckpt_every=0,
                      device="cpu", progress=False)
    optim = OptimConfig(lr=1e-3, warmup_steps=2)
    return Trainer(model, DSMLoss(), TinyImages(), loop, optim, run_dir, {"name": "unet_tiny"}, dist=dist)


def _worker_train(out: Path) -> None:
    dist = DistContext.from_env("cpu")
    trainer = _trainer(out / "run", dist)
    trainer.fit(stop_at=3)  # stop part-way (checkpoint at step 3) ...
    trainer.close()
    resumed = _trainer(out / "run", dist)  # ... and continue from it, as a restarted job would
    assert resumed.try_resume() and resumed.step == 3
    resumed.fit()
    resumed.close()
    torch.save({"model": resumed.model.state_dict(), "ema": resumed.ema.state_dict(),
                "loss": [h["loss"] for h in resumed.history]}, out / f"rank{dist.rank}.pt")


def _worker_eval(config: Path, stop: int) -> None:
    from ssni.config import load_config
    from ssni.evaluate.runner import EvaluateConfig, Evaluation

    evaluation = Evaluation(load_config(EvaluateConfig, config, []),
                            stop_after_batches=stop if stop > 0 else None)
    evaluation.run()
    evaluation.dist.barrier()


def _worker(out: Path, phase: str) -> None:
    """Phase a: training, then an evaluation that dies after 2 batches per rank; phase b: its restart
    and a fresh evaluation (two launches in all: starting torchrun is most of the time here)."""
    if phase == "a":
        _worker_train(out / "train")
        _worker_eval(out / "killed.yaml", 2)  # raises: the job fails as a killed one would
    else:
        _worker_eval(out / "killed.yaml", 0)
        _worker_eval(out / "two.yaml", 0)
        DistContext.from_env("cpu").close()


# -- helpers of the tests ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_and_wait(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; past `timeout`, kill its whole process group (torchrun and the
    workers it started, which would otherwise wait forever in a collective) and raise TimeoutExpired."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), __file__, *args]
    return launch_and_wait(cmd, env, timeout)


def test_epoch_batches_split_the_one_process_batch():
    one = EpochBatches(30, 7, seed=2)
    parts = [EpochBatches(30, 7, seed=2, rank=r, world=3) for r in range(3)]
    assert [p.count for p in parts] == [3, 2, 2]
    for step in range(12):  # over several epochs
        assert torch.equal(torch.cat([p.batch_indices(step) for p in parts]), one.batch_indices(step))


@pytest.fixture(scope="module")
def launches(eval_setup, tmp_path_factory):
    """One-process references, then the two torchrun launches; {name: what the tests check}."""
    from ssni.evaluate.runner import Evaluation

    out = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        ref = _trainer(out / "one-train")
        ref.fit()
        Evaluation(_eval_config(eval_setup, out / "one")).run()
    finally:
        torch.set_num_threads(threads)
    _eval_config(eval_setup, out / "killed")
    _eval_config(eval_setup, out / "two")
    a = _torchrun(str(out), "a")
    kept = {p: p.stat().st_mtime_ns for p in sorted((out / "killed" / "state").rglob("batch_*.json"))}
    b = _torchrun(str(out), "b")
    return {"out": out, "ref": ref, "a": a, "b": b, "kept": kept}


def _log(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_training_equals_one_process(launches):
    out, ref = launches["out"], launches["ref"]
    assert (out / "train" / "rank1.pt").is_file(), _log(launches["a"])
    ranks = [torch.load(out / "train" / f"rank{r}.pt") for r in range(2)]
    for key in ("model", "ema"):
        want = getattr(ref, key).state_dict()
        for got in ranks:
            torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-6)
    # every rank logs the global batch's mean loss, the one one process logs
    torch.testing.assert_close(ranks[1]["loss"], [h["loss"] for h in ref.history[3:]], rtol=1e-4, atol=1e-6)
    assert (out / "train" / "run" / "checkpoints" / "latest.json").is_file()


def _results(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in res["rows"]]
    return {"rows": rows, "per_sample": res["per_sample"], "curves": res["curves"], "flags": res["flags"]}


def test_two_process_evaluation_equals_one_process(launches):
    out = launches["out"]
    assert launches["b"].returncode == 0, _log(launches["b"])
    assert _results(out / "two") == _results(out / "one")
    assert (out / "two" / "report.md").is_file()
    # each rank did its own share of the batches: the state holds them all, the report one copy
    assert len(list((out / "two" / "state").rglob("batch_*.json"))) == len(
        list((out / "one" / "state").rglob("batch_*.json")))


def test_killed_two_process_evaluation_resumes_with_the_same_results(launches):
    out, kept = launches["out"], launches["kept"]
    a, b = launches["a"], launches["b"]
    assert a.returncode != 0 and "stop_after_batches" in a.stderr, _log(a)
    assert len(kept) == 4  # 2 finished batches of each rank survive the failed job
    assert b.returncode == 0 and "reused 4 finished batches" in b.stdout, _log(b)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # kept, not redone
    assert _results(out / "killed") == _results(out / "one")


# -- a tiny evaluation (as in test_evaluate.py) ------------------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A perturbed unet_tiny score model, its calibration and a resnet10t, on 8x8 digits."""
    from ssni.checkpoint import atomic_save_safetensors
    from ssni.data import DataConfig, build_dataset
    from ssni.io import atomic_write_json
    from ssni.models import classifier_spec, create_classifier, save_model
    from ssni.scoring import ScoreNormConfig, calibrate

    root = tmp_path_factory.mktemp("dist-eval")
    with seeded(0):
        sm = create_model("unet_tiny")
        with torch.no_grad():
            for p in sm.parameters():
                p.add_(0.02 * torch.randn_like(p))
        clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    save_model(root / "score", sm)
    train = build_dataset(DataConfig(image_size=8), "train")
    cal, _ = calibrate(sm.eval(), train.images[:32], ScoreNormConfig(timesteps=4), batch_size=32)
    cal.save(root / "calibration.json")
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    return root


def _eval_config(root: Path, run_dir: Path, extra: dict | None = None):
    """The tiny evaluation's config (with `extra` top-level keys replaced), also written as RUN_DIR.yaml."""
    import yaml

    from ssni.config import load_config
    from ssni.evaluate.runner import EvaluateConfig

    rec = {
        "run_dir": str(run_dir), "data": {"name": "digits", "image_size": 8},
        "num_samples": 8, "batch_size": 2, "draws": 2, "progress": False, "device": "cpu",
        "defense": {"score_model": str(root / "score"), "score_weights": "model",
                    "calibration": str(root / "calibration.json"),
                    "score_norm": {"timesteps": 4},
                    "purifier": {"sampler": "ddpm", "steps": 2},
                    "attack_purifier": {"sampler": "ddpm", "steps": 1},
                    "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
                    "mean": [0.0], "std": [1.0], "device": "cpu"},
        "defenses": [{"name": "none"},
                     {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}],
        "attacks": [{"name": "pgd", "attack": "pgd", "eot": 1, "view": "full",
                     "kwargs": {"eps": 0.1, "steps": 1, "step_size": 0.05}}],
        "sweep": {"attack": "pgd", "defenses": ["ssni-n"], "eps": [0.0, 0.1], "num_samples": 4},
    }
    rec.update(extra or {})
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return load_config(EvaluateConfig, path, [])


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), sys.argv[2])
