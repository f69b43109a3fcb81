"""Kill real `ssni train-score` and `ssni evaluate` processes with SIGKILL at random moments, rerun
them, and check that the final weights / results equal those of an uninterrupted run and that
nothing the killed runs left stays behind.

    python tools/kill_test.py --trials 20            # 20 kills of each command (a few minutes)

Each trial starts the command in a fresh run directory, sends SIGKILL after a random delay (drawn
over the uninterrupted run's duration, so kills land in start-up, training, checkpoint publishing,
evaluation batches and report writing), optionally kills the rerun again, then runs the same
command to completion and compares. Targeted trials (`--targeted`, per moment) watch the run
directory and kill the moment a checkpoint is being pruned (.old_step_*) or an end-of-run file is
being written (the temp file of samples.png, summary.json, latest.json). After each rerun the run
directory is searched for leftovers: temp files of atomic writes, temporary or half-pruned
checkpoint directories, incomplete step_N directories. Prints one line per trial and a summary:
`train-score: N kill trials, M mismatches, L leftovers` (target: 0 mismatches, 0 leftovers).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "toolkit"))


def _cmd(args: List[str]) -> List[str]:
    return [sys.executable, "-m", "ssni.cli", *args]


def train_args(run: Path) -> List[str]:
    """A tiny train-score run that checkpoints every 2 steps (many publish windows to hit)."""
    return ["train-score", str(REPO / "recipes/score/digits.yaml"), f"run_dir={run}",
            "model.name=unet_tiny", "data.image_size=8", "loop.steps=24", "loop.batch_size=16",
            "loop.ckpt_every=2", "loop.device=cpu", "loop.progress=false", "eval_draws=1",
            "sample_count=2", "sample_steps=2"]


def eval_args(run: Path, inputs: Path) -> List[str]:
    """A tiny evaluation with several batches per cell (many resume points to hit)."""
    return ["evaluate", str(inputs / "eval.yaml"), f"run_dir={run}"]


def run_to_end(args: List[str], timeout: float = 600) -> Tuple[int, float, str]:
    """Run a command to completion; (exit code, seconds, stderr tail)."""
    t0 = time.perf_counter()
    p = subprocess.run(_cmd(args), capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.perf_counter() - t0, p.stderr[-400:]


def kill_after(args: List[str], delay: float) -> bool:
    """Start a command and SIGKILL it after `delay` seconds; True if it was still running."""
    p = subprocess.Popen(_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        p.kill()  # SIGKILL: no handler runs
        p.wait()
        return True


# moments a targeted trial kills at: the first file or folder under the run directory that matches
MOMENTS = {"pruning": re.compile(r"^\.old_step_"), "samples.png": re.compile(r"^\.samples\.png\..*\.tmp$"),
           "summary.json": re.compile(r"^\.summary\.json\..*\.tmp$"),
           "latest.json": re.compile(r"^\.latest\.json\..*\.tmp$")}


def kill_at(args: List[str], run: Path, moment: str, timeout: float = 600) -> bool:
    """Start a command and SIGKILL it as soon as `moment` is seen under run (or run/checkpoints);
    True if it was killed there (False: it finished first)."""
    pattern = MOMENTS[moment]
    p = subprocess.Popen(_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        for d in (run, run / "checkpoints"):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            if any(pattern.match(n) for n in names):
                p.kill()
                p.wait()
                return True
        time.sleep(0.0005)
    p.wait()
    return False


def leftovers(run: Path) -> List[str]:
    """What killed runs left behind under run: temp files of atomic writes, temporary or half-pruned
    checkpoint directories, step_N directories that lack a file they should hold."""
    from ssni.checkpoint import missing_files

    out = []
    for p in run.rglob("*"):
        name = p.name
        if (p.is_file() and name.startswith(".") and name.endswith(".tmp")) or \
                name.startswith((".tmp_step_", ".old_step_")):
            out.append(str(p.relative_to(run)))
        elif p.is_dir() and name.startswith("step_") and p.parent.name == "checkpoints" and missing_files(p):
            out.append(f"{p.relative_to(run)} (incomplete)")
    return out


def weights(run: Path) -> Dict[str, str]:
    """SHA-256 of the final model and EMA weight files."""
    import hashlib

    from ssni.checkpoint import latest_checkpoint

    d = latest_checkpoint(run / "checkpoints")
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in ("model.safetensors", "ema.safetensors")}


def results(run: Path) -> str:
    """The evaluation's results without timings (rows, per-sample t* and score norms, flags)."""
    res = json.loads((run / "results.json").read_text())
    for r in res["rows"]:
        r.pop("seconds", None)
    return json.dumps({k: res[k] for k in ("rows", "per_sample", "flags", "curves")}, sort_keys=True)


def make_eval_inputs(root: Path, score_run: Path) -> None:
    """A classifier and calibration for the tiny evaluation, plus its recipe."""
    import torch
    import yaml

    from ssni.io import atomic_save_safetensors, atomic_write_json
    from ssni.models import classifier_spec, create_classifier
    from ssni.seeding import seeded

    with seeded(0):
        clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    code, _, err = run_to_end(["calibrate", str(REPO / "recipes/calibrate/digits.yaml"),
                               f"score_model={score_run}", f"output={root / 'cal'}", "count=32",
                               "data.image_size=8", "score_norm.timesteps=4", "plot_noise_std=[]",
                               "device=cpu", "progress=false"])
    assert code == 0, err
    (root / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"name": "digits", "image_size": 8}, "num_samples": 12, "batch_size": 2, "draws": 2,
        "progress": False, "device": "cpu",
        "defense": {"score_model": str(score_run), "calibration": str(root / "cal/calibration.json"),
                    "score_norm": {"timesteps": 4}, "purifier": {"sampler": "ddpm", "steps": 3},
                    "attack_purifier": {"sampler": "ddpm", "steps": 1},
                    "classifier": {"checkpoint": str(root / "clf")}, "mean": [0.0], "std": [1.0],
                    "device": "cpu"},
        "defenses": [{"name": "none"}, {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}],
        "attacks": [{"name": "pgd-eot", "attack": "pgd", "eot": 2, "view": "full",
                     "kwargs": {"eps": 0.1, "steps": 2, "step_size": 0.05}},
                    {"name": "adaptive", "attack": "pgd", "view": "adaptive", "eot": 2,
                     "only_sample_specific": True, "kwargs": {"eps": 0.1, "steps": 2, "step_size": 0.05}}]}))
    torch.manual_seed(0)


def trial(name: str, args_of, reference, duration: float, rng: random.Random, root: Path, i: int,
          compare, moment: str = "") -> Tuple[bool, List[str], int, str]:
    """One kill (sometimes two; at `moment` if given) then a complete rerun; (matches, leftovers,
    kills that landed before the command finished, description)."""
    run = root / f"{name}_{i:03d}"
    if moment:
        killed = [kill_at(args_of(run), run, moment)]
        desc = f"kill at {moment}{'' if killed[0] else ' (missed: had finished)'}"
    else:
        delays = [rng.uniform(0.3, duration)]
        if rng.random() < 0.3:  # kill the rerun too
            delays.append(rng.uniform(0.3, duration))
        killed = [kill_after(args_of(run), d) for d in delays]
        desc = ", ".join(f"kill at {d:.2f}s{'' if k else ' (had finished)'}" for d, k in zip(delays, killed))
    code, _, err = run_to_end(args_of(run))
    if code != 0:
        return False, [], sum(killed), f"rerun failed (exit {code}): " + (err.strip().splitlines() or [""])[-1]
    same = compare(run) == reference
    left = leftovers(run)
    shutil.rmtree(run, ignore_errors=True)
    return same, left, sum(killed), desc


def main(argv=None) -> int:
    """Run the kill trials of both commands and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kill trials per command")
    ap.add_argument("--targeted", type=int, default=1,
                    help=f"train-score trials per targeted moment ({', '.join(MOMENTS)})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="ssni-kill-"))
    failures = left_total = 0
    try:
        ref_run = root / "train_ref"
        code, t_train, err = run_to_end(train_args(ref_run))
        assert code == 0, err
        ref_w = weights(ref_run)
        print(f"train-score uninterrupted: {t_train:.1f} s", flush=True)
        make_eval_inputs(root, ref_run)
        ref_eval = root / "eval_ref"
        code, t_eval, err = run_to_end(eval_args(ref_eval, root))
        assert code == 0, err
        ref_res = results(ref_eval)
        print(f"evaluate uninterrupted: {t_eval:.1f} s", flush=True)
        targeted = [m for m in MOMENTS for _ in range(args.targeted)]
        for name, args_of, ref, dur, cmp, moments in (
                ("train-score", train_args, ref_w, t_train, weights, [""] * args.trials + targeted),
                ("evaluate", lambda r: eval_args(r, root), ref_res, t_eval, results, [""] * args.trials)):
            bad = left_n = landed = 0
            for i, moment in enumerate(moments):
                ok, left, kills, desc = trial(name, args_of, ref, dur, rng, root, i, cmp, moment)
                bad += not ok
                left_n += len(left)
                landed += kills
                print(f"{name} trial {i + 1:2d}: {'same as uninterrupted' if ok else 'MISMATCH'}, "
                      f"{len(left)} left behind{f' {left}' if left else ''} ({desc})", flush=True)
            print(f"{name}: {len(moments)} kill trials ({landed} kills landed before the command finished), "
                  f"{bad} mismatches, {left_n} leftovers", flush=True)
            failures += bad
            left_total += left_n
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures or left_total else 0


if __name__ == "__main__":
    sys.exit(main())
