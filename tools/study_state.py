"""Carry a long study's finished batches across machines: from its run dirs into the repository, and back.

    python tools/study_state.py save     [--runs runs/fmnist] [--into results/fmnist/state]
    python tools/study_state.py restore  [--runs runs/fmnist] [--into results/fmnist/state]
    python tools/study_state.py status   [--runs runs/fmnist] [--into results/fmnist/state]

Every `ssni evaluate` run dir resumes from its run_dir/state: one JSON file per finished batch, under
the key of the inputs it was computed from (`ssni.evaluate.jobs`). Run dirs live outside the
repository, and the machine that holds them can be replaced between sessions; a study of many hours
on 2 cores then needs its finished batches carried over. `save` copies every evaluation's state (a
few tens of KB per batch), the adversarial images of each cell's first batch (those the summary
shows; the rest are not carried) and the fitted files in CARRY into --into; `restore` copies them
back wherever the run dirs lack them.

Nothing is ever overwritten or deleted: a file present on both sides with other bytes is an error
that names it. What a restored state is worth is decided by the evaluation itself: its key covers the
weights of both networks, the data and the calibration, so after the networks are retrained (the
training is bit-identical at the thread count the configs record) a restored state is resumed only
if they came out the same, and refused with what changed otherwise.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Tuple

# fitted files the evaluations read that took hours to make (the learned reweight: a fit of 3 h);
# the calibration is not carried: recomputing it takes minutes and checks the score network again
CARRY = ("reweight/reweight.json",)
# the adversarial images of each cell's first batch (200 KB at 64 Fashion-MNIST images), those the
# summary shows; the rest stay in the run dir (all of them would be tens of MB)
CARRY_GLOBS = ("*/adv/*/*/batch_00000.safetensors",)


def state_files(runs: Path) -> Dict[str, Path]:
    """{relative path: file} of every evaluation state's files under runs (<run>/state/**.json)."""
    out = {}
    for meta in sorted(runs.glob("*/state/fingerprint.json")):
        state = meta.parent
        # a write in flight is a hidden .tmp file (ssni.io's atomic writes), never a *.json
        out.update({str(f.relative_to(runs)): f for f in sorted(state.rglob("*.json"))})
    for rel in CARRY:
        if (runs / rel).is_file():
            out[rel] = runs / rel
    for pattern in CARRY_GLOBS:
        out.update({str(f.relative_to(runs)): f for f in sorted(runs.glob(pattern))})
    return out


def copy_missing(src: Dict[str, Path], dest: Path) -> Tuple[List[str], List[str]]:
    """Copy each file of src to dest/<rel> unless it is there; ([copied], [already there, same bytes]).
    ValueError naming the files that are there with other bytes (nothing is copied then)."""
    clash = [rel for rel, f in src.items() if (dest / rel).is_file() and not filecmp.cmp(f, dest / rel, shallow=False)]
    if clash:
        raise ValueError(f"{len(clash)} file(s) under {dest} differ from the ones to copy (first: {clash[0]}); "
                         "they were computed from other inputs. Nothing was copied; move one side away first")
    copied, same = [], []
    for rel, f in src.items():
        target = dest / rel
        if target.is_file():
            same.append(rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".copying")
        shutil.copyfile(f, tmp)
        tmp.replace(target)  # a kill mid-copy leaves no half file under the real name
        copied.append(rel)
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
    """{relative path: file} of a snapshot made by `save`."""
    return {str(f.relative_to(into)): f for f in sorted(into.rglob("*")) if f.is_file() and ".copying" not in f.name}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["save", "restore", "status"])
    p.add_argument("--runs", default="runs/fmnist", help="the study's run dirs (default: runs/fmnist)")
    p.add_argument("--into", default="results/fmnist/state", help="the snapshot in the repository")
    args = p.parse_args(argv)
    runs, into = Path(args.runs), Path(args.into)
    try:
        if args.action == "save":
            copied, same = copy_missing(state_files(runs), into)
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
    except ValueError as e:
        print(f"study_state: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
