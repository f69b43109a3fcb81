"""The TS experiment on the embedded photos: DnCNN (two depths) trained with Gaussian and with TS
noise, plus a small U-Net denoiser, at sigma 25/255; then PSNR/SSIM clean and under
denoising-PGD, typical-set statistics, and the transfer matrix across all of them.

    .venv/bin/python tools/ts_experiment.py                 # ~15 min on 2 shared CPU cores
    .venv/bin/python tools/ts_experiment.py --quick         # a 1-minute smoke run

Writes <out>/report.md (training table + evaluation tables), <out>/eval/{transfer,examples,
ts_statistic}.png and results.json, and prints the tables. Training runs resume, and attack
deltas are cached, so a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "toolkit"))

from ssni.commands.train_denoiser import DenoiserTrainConfig, train_denoiser  # noqa: E402
from ssni.config import load_config  # noqa: E402
from ssni.data import DataConfig, build_dataset  # noqa: E402
from ssni.data.photos import PHOTO_TEST  # noqa: E402
from ssni.denoise.evaluate import AttackConfig, evaluate_models, markdown_report, write_outputs  # noqa: E402
from ssni.io import atomic_write_json, atomic_write_text  # noqa: E402
from ssni.models import load_model  # noqa: E402

# label -> (model name, model kwargs, noise name, steps key)
MODELS = {
    "dncnn5": ("dncnn_small", {"depth": 5, "width": 32}, "gaussian", "steps"),
    "dncnn5_ts": ("dncnn_small", {"depth": 5, "width": 32}, "typical_set", "steps"),
    "dncnn8": ("dncnn_small", {"depth": 8, "width": 32}, "gaussian", "steps"),
    "dncnn8_ts": ("dncnn_small", {"depth": 8, "width": 32}, "typical_set", "steps"),
    "unet": ("unet_denoiser", {"ch": 16, "ch_mult": [1, 2, 2]}, "gaussian", "unet_steps"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "ts-experiment"))
    ap.add_argument("--sigma", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=600, help="DnCNN training steps")
    ap.add_argument("--unet-steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=128, help="train tiles / test crops")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.unet_steps, args.attack_steps, args.image_size = 20, 10, 2, 64
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    steps = {"steps": args.steps, "unet_steps": args.unet_steps}
    train_rows, paths = [], {}
    # wall time of each training, kept across reruns (a rerun only resumes finished runs)
    times_file = out / "train_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    for label, (name, kw, noise, skey) in MODELS.items():
        recipe = ROOT / "recipes" / "denoiser" / ("dncnn_photos_ts.yaml" if noise == "typical_set"
                                                 else "dncnn_photos.yaml")
        cfg = load_config(DenoiserTrainConfig, recipe, [
            f"run_dir={out / 'train' / label}", f"model.name={name}", f"sigma={args.sigma:g}",
            f"patch_size={args.patch}", f"data.image_size={args.image_size}",
            f"loop.steps={steps[skey]}", f"loop.batch_size={args.batch}", "loop.ema_decay=0.99",
            f"loop.ckpt_every={max(100, steps[skey] // 3)}", "optim.schedule=cosine"])
        cfg.model.kwargs = dict(kw)
        t0 = time.time()
        res = train_denoiser(cfg)
        if res["test_psnr_before"] is not None or label not in times:  # it trained just now
            times[label] = time.time() - t0
            atomic_write_json(times_file, times)
        seconds = times[label]
        n_params = sum(p.numel() for p in load_model(cfg.run_dir).parameters())
        train_rows.append((label, name, kw, noise, res, seconds, n_params))
        paths[label] = cfg.run_dir
        print(f"[train] {label}: test PSNR {res['test_psnr_ema']:.2f} dB ({seconds:.0f} s)", flush=True)

    data = DataConfig(name="photos", image_size=args.image_size, channels=1)
    x = build_dataset(data, "test").images
    models = {label: load_model(p, weights="ema") for label, p in paths.items()}
    attacks = [AttackConfig(norm="linf", eps=2.0, steps=args.attack_steps),
               AttackConfig(norm="linf", eps=4.0, steps=args.attack_steps),
               AttackConfig(norm="l2", eps=4.0, steps=args.attack_steps, zero_mean=True)]
    fresh = not (out / "eval" / "deltas").is_dir()
    t0 = time.time()
    ev = evaluate_models(models, x, args.sigma, attacks, "linf-4", seed=0, batch_size=5,
                         cache_dir=out / "eval" / "deltas", progress=True)
    if fresh or "evaluation" not in times:  # attacks were computed now, not read from the cache
        times["evaluation"] = time.time() - t0
        atomic_write_json(times_file, times)
    eval_seconds = times["evaluation"]
    figs = write_outputs(ev, out / "eval", "TS experiment: evaluation")
    res = ev["results"]

    lines = ["# TS experiment on scikit-image's bundled photos", "",
             f"Command: `.venv/bin/python tools/ts_experiment.py{' --quick' if args.quick else ''}` "
             f"(torch threads {args.threads}). Grey-scale; train tiles {args.image_size}px of the "
             f"train photos, random {args.patch}x{args.patch} patches, batch {args.batch}, AdamW "
             f"1e-3 cosine, EMA 0.99; test: centre {args.image_size}px crops of "
             f"{', '.join(PHOTO_TEST)}. "
             f"sigma = {args.sigma:g}/255. TS noise: half the patches get radius ratio U(1.05, 1.30) "
             f"(our own default).", "",
             "## Training", "",
             "| model | network | noise | params | steps | time (s) | test PSNR (dB) | test SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    for label, name, kw, noise, r, sec, n in train_rows:
        lines.append(f"| {label} | {name} {json.dumps(kw)} | {noise} | {n} | {r['steps']} | "
                     f"{sec:.0f} | {r['test_psnr_ema']:.2f} | {r['test_ssim_ema']:.4f} |")
    lines += ["", f"Noisy input PSNR: {res['noisy']['psnr']:.2f} dB. Evaluation (attacks, baselines, "
              f"transfer matrix) took {eval_seconds:.0f} s.", "", "## Headline: DnCNN, Gaussian vs TS training", "",
              "| model | no attack | PGD Linf 2/255 | PGD Linf 4/255 | PGD L2 zero-mean (RMS 4/255) | "
              "random Linf 4/255 |", "|---|---|---|---|---|---|"]
    for label, m in res["models"].items():
        a = m["attacks"]
        lines.append(f"| {label} | {m['clean']['psnr']:.2f} | {a['linf-2']['psnr']:.2f} | "
                     f"{a['linf-4']['psnr']:.2f} | {a['l2-4-zm']['psnr']:.2f} | "
                     f"{a['linf-4']['random_psnr']:.2f} |")
    body = markdown_report(res, "Evaluation").split("\n", 1)[1]
    lines += ["", "(PSNR in dB.)", "", body.replace("\n## ", "\n### "), "",
              "Figures: `eval/transfer.png`, `eval/examples.png`, `eval/ts_statistic.png`."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    print(text)
    print(json.dumps({"report": str(out / "report.md"), **figs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
