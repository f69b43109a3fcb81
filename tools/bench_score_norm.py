"""Benchmark: score-norm cost as a fraction of purification cost, at the default settings.

Defaults: ScoreNormConfig() (T' = 20 steps, 1 draw) and PurifierConfig() (DiffPure SDE, dt = 1e-3)
at DiffPure's t* = 0.1, plus the per-sample t* SSNI-N gives clean-looking inputs (about half of
t* + b). Weights are random (cost does not depend on them). Prints wall-time ratios and the
network-evaluation ratios they should follow.

    .venv/bin/python tools/bench_score_norm.py                 # unet_digits, CPU
    .venv/bin/python tools/bench_score_norm.py --model ddpmpp_cifar10 --batch 8 --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch

from ssni.models import create_model
from ssni.purify import PurifierConfig, build_purifier
from ssni.scoring import ScoreNorm, ScoreNormConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up (seconds)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Time the score norm and the purifier on one batch and print their ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    x = torch.rand(args.batch, *model.input_shape, device=device)
    seeds = torch.arange(args.batch)
    sn_cfg, p_cfg = ScoreNormConfig(), PurifierConfig()
    scorer = ScoreNorm.from_config(model, sn_cfg)
    purifier = build_purifier(model, p_cfg)
    t_ssni = 0.5 * (args.t_star + 0.005)  # SSNI-N at a clean-looking sample: sigmoid(0) (t*+b)

    with torch.no_grad():
        t_score = timed(lambda: scorer(x, seeds=seeds), args.repeats, device)
        t_net = timed(lambda: model(x, torch.full((args.batch,), 0.05, device=device)),
                      args.repeats, device)
        rows = []
        for label, t in (("DiffPure t*=%.3g" % args.t_star, args.t_star),
                         ("SSNI-N clean t*=%.3g" % t_ssni, t_ssni)):
            t_pur = timed(lambda: purifier(x, t, seeds=seeds), args.repeats, device)
            rows.append((label, t_pur, purifier.nfe_last / args.batch))
    nfe_score = scorer.nfe_per_sample
    print(f"model {args.model} on {device} ({args.threads} thread(s)), batch {args.batch}; "
          f"score norm: T'={sn_cfg.timesteps}, draws={sn_cfg.draws}, max_batch={sn_cfg.max_batch}; "
          f"purifier: {p_cfg.sampler}, dt={p_cfg.dt}")
    print(f"one batched network call: {t_net * 1e3:.1f} ms; score norm: {t_score * 1e3:.1f} ms "
          f"({nfe_score} evaluations/sample, {t_score / (nfe_score * t_net):.2f}x the "
          f"network floor)")
    for label, t_pur, nfe in rows:
        print(f"{label:>24}: purification {t_pur * 1e3:8.1f} ms ({nfe:.0f} evaluations/sample); "
              f"score norm / purification = {t_score / t_pur:.3f} wall, "
              f"{nfe_score / nfe:.3f} in evaluations; SSNI total / plain = "
              f"{(t_score + t_pur) / t_pur:.3f}")


if __name__ == "__main__":
    main()
