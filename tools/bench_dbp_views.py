"""One PGD-EOT step on a DBP defense (constant t*): the attack view without the score norm it does not
need (what `RobustClassifier.view` runs) against the same step computing it, side by side in one run.

    .venv/bin/python tools/bench_dbp_views.py --defense-recipe recipes/fmnist/defense.yaml   # after the
        # Fashion-MNIST networks exist (tools/fmnist_study.sh networks)
    .venv/bin/python tools/bench_dbp_views.py                                                 # tiny random networks

Both passes run the same purifier with the same seeds (their gradients are checked equal); the
second one also runs the score norm, as every attack call did before views skipped it for DBP. Prints
the median seconds per gradient step of each and their ratio, over --repeats alternating repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toolkit"))

from ssni.defense import RobustClassifier, ViewSpec  # noqa: E402
from ssni.models import create_classifier, create_model  # noqa: E402
from ssni.purify import PurifierConfig, build_purifier  # noqa: E402
from ssni.scoring import ScoreNormConfig, build_reweight  # noqa: E402


def _tiny() -> RobustClassifier:
    """A random unet_tiny and resnet10t on 8x8 images, 5-step DDPM, 10-step score norm, t* = 0.2."""
    torch.manual_seed(0)
    sm = create_model("unet_tiny").eval()
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    return RobustClassifier(classifier=clf, score_model=sm, purifier=build_purifier(sm, PurifierConfig("ddpm", steps=5)),
                            reweight=build_reweight("constant", t_base=0.2), score_norm=ScoreNormConfig(timesteps=10),
                            input_size=8, mean=[0.0], std=[1.0])


def step(d: RobustClassifier, x: torch.Tensor, seeds: torch.Tensor, view: ViewSpec) -> tuple:
    """Seconds of one loss gradient through the view (EOT copies in x), and the gradient."""
    xg = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    out = d.run(xg, seeds, view)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)), xg)
    return time.perf_counter() - t0, g


def main(argv=None) -> int:
    """Time both passes alternately and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense-recipe", default=None)
    p.add_argument("--batch", type=int, default=32, help="images x EOT copies per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    d = (RobustClassifier.from_recipe(a.defense_recipe).replace(reweight=build_reweight("constant", t_base=0.2))
         if a.defense_recipe else _tiny())
    c, h, w = d.score_model.input_shape
    x, seeds = torch.rand(a.batch, c, h, w, generator=torch.Generator().manual_seed(0)), torch.arange(a.batch)
    skip, compute = ViewSpec(purifier="defense"), ViewSpec(purifier="defense", through_t_star=True)
    times = {"view (no norm)": [], "with the norm": []}
    for _ in range(a.repeats):
        t1, g1 = step(d, x, seeds, skip)
        t2, g2 = step(d, x, seeds, compute)
        if not torch.equal(g1, g2):
            raise SystemExit("the two passes' gradients differ: the comparison is void")
        times["view (no norm)"].append(t1)
        times["with the norm"].append(t2)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DBP t* = 0.2, {a.batch} images per step, {a.threads} thread(s), median of {a.repeats}:")
    for k, v in med.items():
        print(f"  {k:<16} {v:.3f} s per gradient step")
    print(f"  speed-up: {med['with the norm'] / med['view (no norm)']:.2f}x (gradients equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
