"""On a CPU with N cores: one process with N threads against N processes of one thread each (what
`torchrun --nproc_per_node N` with SSNI_THREADS=1 runs), images per second of one attack's gradient
steps through a defense, side by side in one run.

    .venv/bin/python tools/bench_threads.py --defense-recipe recipes/fmnist/defense.yaml   # after the
        # Fashion-MNIST networks exist (tools/fmnist_study.sh networks)
    .venv/bin/python tools/bench_threads.py                                                 # tiny random networks

Each worker times --steps gradient steps of a batch (images x EOT copies) through --view (full:
the purifier; adaptive: also the score norm and t*(x)) of the defense with SSNI-N's reweight; the
two layouts alternate --repeats times. Prints each layout's median throughput and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "toolkit"))

from ssni.defense import VIEWS, RobustClassifier  # noqa: E402
from ssni.scoring import build_reweight  # noqa: E402


def _defense(recipe: str | None) -> RobustClassifier:
    """The recipe's defense (or bench_dbp_views' tiny random one) with SSNI-N at t_base 0.2."""
    if recipe:
        d = RobustClassifier.from_recipe(recipe)
        return d.replace(reweight=build_reweight("sigmoid", d.calibration, t_base=0.2, b=0.005))
    from bench_dbp_views import _tiny  # a sibling script (tools/ is this script's first import path)

    return _tiny().replace(reweight=build_reweight("sigmoid", t_base=0.2, b=0.005, mu=10.0, tau=1.0))


def worker(a: argparse.Namespace) -> None:
    """Time a.steps gradient steps at a.threads threads; print {"seconds": ..., "images": ...} as JSON."""
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    d = _defense(a.defense_recipe)
    c, h, w = d.score_model.input_shape
    x = torch.rand(a.batch, c, h, w, generator=torch.Generator().manual_seed(0))
    seeds, y = torch.arange(a.batch), torch.zeros(a.batch, dtype=torch.long)
    view = d.view(VIEWS.get(a.view))

    def one() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(view(xg, seeds), y), xg)

    one()  # warm-up: allocator, oneDNN kernels
    t0 = time.perf_counter()
    for _ in range(a.steps):
        one()
    print(json.dumps({"seconds": time.perf_counter() - t0, "images": a.steps * a.batch}))


def layout(a: argparse.Namespace, procs: int, threads: int) -> float:
    """Images per second of `procs` workers of `threads` threads each, started together."""
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--batch", str(a.batch),
           "--steps", str(a.steps), "--view", a.view] + (["--defense-recipe", a.defense_recipe] if a.defense_recipe else [])
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in running]
    if any(p.returncode for p in running):
        raise SystemExit("a worker failed")
    # the slowest worker bounds the layout: all of them must finish the work
    return sum(o["images"] for o in outs) / max(o["seconds"] for o in outs)


def main(argv=None) -> int:
    """Alternate the two layouts and print their throughputs and ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense-recipe", default=None)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="images x EOT copies per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--view", default="full", choices=["full", "adaptive"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    got = {"threads": [], "processes": []}
    for _ in range(a.repeats):
        got["threads"].append(layout(a, 1, a.cores))
        got["processes"].append(layout(a, a.cores, 1))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"{a.view} view, {a.batch} images per step, {a.steps} steps per worker, median of {a.repeats}:")
    print(f"  1 process x {a.cores} threads: {med['threads']:.2f} images/s")
    print(f"  {a.cores} processes x 1 thread: {med['processes']:.2f} images/s")
    print(f"  ratio (processes / threads): {med['processes'] / med['threads']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
