"""Speed-up of an evaluation under torchrun with 2 processes over 1, measured side by side.

    .venv/bin/python tools/bench_dist.py [--samples 48] [--batch 4] [--eot 2] [--eot-across-ranks]

Builds a tiny defense (perturbed unet_tiny score model, its calibration, a resnet10t on 8x8 digits),
then runs the same evaluation with `torch.distributed.run --nproc_per_node 1` and `... 2` (one thread
per process, gloo on CPU), each in a fresh run directory, and prints the time of `Evaluation.run()`
(rank 0, after a barrier) and of the whole launch (with start-up), and the speed-up (ideal 2.0).
With --eot-across-ranks the 2-process run splits each batch's EOT copies across the processes
(`eot_across_ranks: true`) instead of the batches.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(config: str, out: str) -> None:
    import torch

    from ssni.config import load_config
    from ssni.evaluate.runner import EvaluateConfig, Evaluation

    torch.set_num_threads(1)
    evaluation = Evaluation(load_config(EvaluateConfig, config, []))
    evaluation.dist.barrier()
    t0 = time.perf_counter()
    evaluation.run()
    evaluation.dist.barrier()
    seconds = time.perf_counter() - t0
    if evaluation.dist.is_main:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    evaluation.dist.close()


def _setup(root: Path, samples: int, batch: int, eot: int = 2, across: bool = False) -> None:
    import torch
    import yaml

    from ssni.checkpoint import atomic_save_safetensors
    from ssni.data import DataConfig, build_dataset
    from ssni.io import atomic_write_json
    from ssni.models import classifier_spec, create_classifier, create_model, save_model
    from ssni.scoring import ScoreNormConfig, calibrate
    from ssni.seeding import seeded

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
    for name in ("one", "two"):
        rec = {
            "run_dir": str(root / name), "data": {"name": "digits", "image_size": 8},
            "num_samples": samples, "batch_size": batch, "draws": 2, "progress": False, "device": "cpu",
            "defense": {"score_model": str(root / "score"), "score_weights": "model",
                        "calibration": str(root / "calibration.json"), "score_norm": {"timesteps": 4},
                        "purifier": {"sampler": "ddpm", "steps": 4},
                        "attack_purifier": {"sampler": "ddpm", "steps": 2},
                        "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
                        "mean": [0.0], "std": [1.0], "device": "cpu"},
            "defenses": [{"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}],
            "attacks": [{"name": "pgd", "attack": "pgd", "eot": eot, "view": "full",
                         "kwargs": {"eps": 0.1, "steps": 3, "step_size": 0.05}}],
            "checks": False, "eot_across_ranks": across and name == "two",
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(rec))


def _launch(n: int, config: Path, out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker", str(config), str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eot", type=int, default=2, help="EOT copies of the attack")
    ap.add_argument("--eot-across-ranks", action="store_true", help="2 processes split the EOT copies, not batches")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _setup(root, args.samples, args.batch, args.eot, args.eot_across_ranks)
        wall1 = _launch(1, root / "one.yaml", root / "one.json")
        wall2 = _launch(2, root / "two.yaml", root / "two.json")
        run1 = json.loads((root / "one.json").read_text())["seconds"]
        run2 = json.loads((root / "two.json").read_text())["seconds"]
        same = json.loads((root / "one" / "results.json").read_text())["per_sample"] == json.loads(
            (root / "two" / "results.json").read_text())["per_sample"]
    split = "EOT copies" if args.eot_across_ranks else "batches"
    print(f"evaluation of {args.samples} images, batches of {args.batch}, EOT {args.eot}, 2 processes split "
          f"{split}, on {os.cpu_count()} CPU cores")
    print(f"1 process : run {run1:7.2f} s   launch {wall1:7.2f} s")
    print(f"2 processes: run {run2:7.2f} s   launch {wall2:7.2f} s")
    print(f"speed-up (ideal 2.0): run {run1 / run2:.2f}x   launch {wall1 / wall2:.2f}x   "
          f"same per-sample results: {same}")


if __name__ == "__main__":
    main()
