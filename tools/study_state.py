"""Carry a long study's networks and finished batches across machines: run dirs to the repository and back.

    python tools/study_state.py save     [--runs runs/fmnist] [--into results/fmnist/state]
    python tools/study_state.py restore  [--runs runs/fmnist] [--into results/fmnist/state]
    python tools/study_state.py status   [--runs runs/fmnist] [--into results/fmnist/state]

Every `ssni evaluate` run dir resumes from its run_dir/state: one JSON file per finished batch, under
the key of the inputs it was computed from (`ssni.evaluate.jobs`). Run dirs live outside the
repository, and the machine that holds them can be replaced between sessions; a study of many hours
on 2 cores then needs its finished batches carried over. `save` copies every evaluation's state (a
few tens of KB per batch), the adversarial images of each cell's first batch (those the summary
shows; the rest are not carried), the fitted files in CARRY and the networks of the finished trainings
in TRAINED into --into; `restore` copies them back wherever the run dirs lack them (a restored
training is not redone: `ssni train-score` finds its summary.json and says so; its EMA weights are
what the study's recipes load from the run dir; to train it further, start a new run dir).

Nothing is ever overwritten or deleted: a file present on both sides with other content is an error
that names it (a batch computed twice from the same inputs differs only in its wall time, which is
not compared). What a restored state is worth is decided by the evaluation itself: its key covers the
weights of both networks, the data and the calibration, so a restored state is resumed only with the
networks it was computed with (the carried ones), and refused with what changed otherwise (e.g. after
a retraining on another machine).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]

# fitted files the evaluations read that took hours to make (the learned reweight: a fit of 3 h);
# the calibration is not carried: recomputing it takes minutes and checks the score network again
CARRY = ("reweight/reweight.json",)
# finished training runs, carried as what the study reads from them: their config, summary and sample
# grid, and the final checkpoint's EMA weights (model.json + ema.safetensors, 45 MB for the ResNet-18
# classifier, 5 MB for the score network), which a restore puts at the top of the run dir, where
# `load_model(run_dir)` finds them before any checkpoints. Retraining is no substitute: the same recipe
# at the same thread count gave other weights on another machine (other CPU kernels)
TRAINED = ("score", "classifier")
TRAINED_FILES = ("config.yaml", "summary.json", "samples.png")
# what a batch file records that two computations of it from the same inputs do not share
VOLATILE = ("seconds",)


def state_files(runs: Path) -> Dict[str, Path]:
    """{relative path: file} of what `save` carries from runs: every evaluation's state
    (<run>/state/**.json), the adversarial images of each cell's first batch once that batch is
    saved (<run>/adv/<cell>/<key>/batch_00000.safetensors: the summary's grid; the rest stay behind),
    the files in CARRY and the networks of the finished trainings in TRAINED."""
    out = {}
    for meta in sorted(runs.glob("*/state/fingerprint.json")):
        state = meta.parent
        # a write in flight is a hidden .tmp file (ssni.io's atomic writes), never a *.json
        out.update({str(f.relative_to(runs)): f for f in sorted(state.rglob("*.json"))})
        for adv in sorted(state.parent.glob("adv/*/*/batch_00000.safetensors")):
            # the images are written before their batch's results: carried only once those are saved
            if (state / adv.parent.parent.name / adv.parent.name / "batch_00000.json").is_file():
                out[str(adv.relative_to(runs))] = adv
    for rel in CARRY:
        if (runs / rel).is_file():
            out[rel] = runs / rel
    for name in TRAINED:
        out.update(finished_training(runs / name))
    return out


def finished_training(run: Path) -> Dict[str, Path]:
    """{<run name>/<file>: file} of a finished training run (summary.json written, which comes after the
    last checkpoint): TRAINED_FILES, and model.json + ema.safetensors of what `load_model(run)` reads (the
    top of the run dir, where a restore put them, else the newest complete checkpoint); {} until then."""
    if not (run / "summary.json").is_file():
        return {}
    # imported here: restore and status need no torch (the study's script may run this with any python3)
    sys.path.insert(0, str(ROOT / "toolkit"))
    from ssni.checkpoint import latest_checkpoint

    weights = run if (run / "model.json").is_file() else latest_checkpoint(run / "checkpoints")
    files = {f: run / f for f in TRAINED_FILES if (run / f).is_file()}
    files.update({f: weights / f for f in ("model.json", "ema.safetensors") if (weights / f).is_file()})
    return {f"{run.name}/{name}": f for name, f in files.items()}


def _content(path: Path) -> Any:
    """What two copies of a file must share: a batch's JSON without its wall time, else the bytes."""
    if path.name.startswith("batch_") and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return {k: v for k, v in data.items() if k not in VOLATILE}
        except ValueError:
            pass
    return path.read_bytes()


def _copy_new(src: Path, target: Path) -> bool:
    """Copy src to target (its times kept) unless target exists, never overwriting it, even when it
    appears meanwhile; a kill leaves at most a hidden temp file (ssni.io's pattern, cleaned by the
    evaluation's start). Whether it copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)
        os.link(tmp, target)  # fails if the target exists: no overwrite, even in a race
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def copy_missing(src: Dict[str, Path], dest: Path) -> Tuple[List[str], List[str]]:
    """Copy each file of src to dest/<rel> unless it is there; ([copied], [already there, same content]).
    ValueError naming the files that are there with other content (nothing is copied then)."""
    clash = [rel for rel, f in src.items() if (dest / rel).is_file() and not filecmp.cmp(f, dest / rel, shallow=False)
             and _content(f) != _content(dest / rel)]  # equal bytes (nearly always) are never parsed
    if clash:
        raise ValueError(f"{len(clash)} file(s) under {dest} differ from the ones to copy (first: {clash[0]}): "
                         "results of other inputs (weights, data, calibration or config). Nothing was copied; "
                         "move one side away first")
    copied, same = [], []
    # a training's summary.json last: a copy killed midway must not leave a "finished" run without weights
    for rel, f in sorted(src.items(), key=lambda item: Path(item[0]).name == "summary.json"):
        (copied if not (dest / rel).is_file() and _copy_new(f, dest / rel) else same).append(rel)
    return copied, same


def batches_per_run(files: Dict[str, Path]) -> Dict[str, int]:
    """{run: number of finished batches} of a state_files / snapshot listing (adversarial images aside)."""
    out: Dict[str, int] = {}
    for rel in files:
        if Path(rel).name.startswith("batch_") and rel.endswith(".json"):
            run = rel.split("/", 1)[0]
            out[run] = out.get(run, 0) + 1
    return out


def snapshot_files(into: Path) -> Dict[str, Path]:
    """{relative path: file} of a snapshot made by `save` (temp files of a killed copy aside)."""
    return {str(f.relative_to(into)): f for f in sorted(into.rglob("*"))
            if f.is_file() and not f.name.endswith(".tmp")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["save", "restore", "status"])
    p.add_argument("--runs", default=str(ROOT / "runs" / "fmnist"), help="the study's run dirs (runs/fmnist)")
    p.add_argument("--into", default=str(ROOT / "results" / "fmnist" / "state"),
                   help="the snapshot in the repository (results/fmnist/state)")
    args = p.parse_args(argv)
    runs, into = Path(args.runs), Path(args.into)
    try:
        if args.action == "save":
            found = state_files(runs)
            if not any(rel.endswith("state/fingerprint.json") for rel in found):
                raise ValueError(f"no evaluation state under {runs} (expected <run>/state/fingerprint.json); "
                                 "nothing to save. Is --runs the study's run dirs?")
            copied, same = copy_missing(found, into)
            print(f"saved {len(copied)} new file(s) into {into} ({len(same)} already there); "
                  f"batches per run: {batches_per_run(snapshot_files(into))}")
        elif args.action == "restore":
            if not into.is_dir():
                print(f"no snapshot at {into}: nothing to restore")
                return 0
            copied, same = copy_missing(snapshot_files(into), runs)
            print(f"restored {len(copied)} file(s) into {runs} ({len(same)} already there); "
                  f"batches per run: {batches_per_run(snapshot_files(into))}")
        else:
            here, saved = batches_per_run(state_files(runs)), batches_per_run(snapshot_files(into))
            for run in sorted(set(here) | set(saved)):
                print(f"{run}: {here.get(run, 0)} batch(es) in {runs}, {saved.get(run, 0)} in {into}")
    except (ValueError, OSError, RuntimeError) as e:  # e.g. a finished training without a complete checkpoint
        print(f"study_state: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
