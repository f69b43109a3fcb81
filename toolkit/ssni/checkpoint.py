"""Training checkpoints: atomic directories of safetensors weights, JSON state, optimizer state.

Layout: <run>/checkpoints/step_00000500/{model,ema}.safetensors, model.json (how to rebuild the
network), state.json (step, extra), optimizer.pt (tensors and plain containers only, loadable with
torch.load(weights_only=True)); <run>/checkpoints/latest.json names the newest complete one.

Publishing a checkpoint can be killed at any instant: a directory is written and fsynced under a
temporary name, then renamed to step_N (so every step_N directory is complete), then latest.json
is rewritten atomically. The directory that latest.json names is never deleted before a newer one
is published; a step already published is not written again. If latest.json is missing or names
something unreadable or incomplete, the newest complete step_N directory is used, with a warning.
A step_N is complete when it holds every file its state.json lists (a checkpoint whose optimizer.pt
or ema.safetensors was deleted is not). Old checkpoints are pruned by renaming them away before
deleting them, and the next save (or run) removes what a killed one left: temporary and
half-pruned directories, temp files, incomplete older steps.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .io import (
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_json,
    fsync_dir,
    load_safetensors,
    pid_alive,
    remove_stale_temps,
    safe_torch_load,
)

_REQUIRED = ("model.safetensors", "model.json", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used (unreadable, or for another model)."""


def clean_stale(root: str | os.PathLike) -> List[Path]:
    """Remove what killed runs left under root: temporary checkpoint directories (.tmp_step_*) and
    directories being pruned (.old_step_*) of processes that no longer run, temp files of atomic
    writes (e.g. of latest.json), and incomplete step_N directories older than the newest complete
    one (a prune killed half-way)."""
    root = Path(root)
    removed = []
    for p in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:
        try:
            pid = int(p.name.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid < 0 or not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    removed += remove_stale_temps(root, depth=0)
    found = complete_checkpoints(root)
    for p in root.glob("step_*"):
        if found and p.name < found[-1].name and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def missing_files(path: Path, need: Sequence[str] = ()) -> List[str]:
    """Files a checkpoint directory lacks: the required ones, those its state.json says were written,
    and `need` (what the caller resumes from, e.g. the optimizer state)."""
    if not path.is_dir():
        return ["the directory"]
    want = list(_REQUIRED) + list(need)
    try:
        want += json.loads((path / "state.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        pass  # state.json missing or unreadable: reported as missing below when it is absent
    return sorted({f for f in want if not (path / f).is_file()})


def _complete(path: Path, need: Sequence[str] = ()) -> bool:
    return not missing_files(path, need)


def complete_checkpoints(root: str | os.PathLike, need: Sequence[str] = ()) -> List[Path]:
    """Complete step_N directories under root (holding `need` too), oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if _complete(p, need))


def _prune(path: Path) -> None:
    """Delete a checkpoint directory: renamed away first, so a kill never leaves a half-deleted step_N."""
    doomed = path.with_name(f".old_{path.name}_{os.getpid()}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: nn.Module,
                    ema: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer],
                    spec: Dict[str, Any], state: Dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Publish a complete checkpoint directory, point latest.json at it, prune old ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    final = root / f"step_{step:08d}"
    if not _complete(final):  # a step already published holds this very state: keep it
        tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        atomic_save_safetensors(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            atomic_save_safetensors(tmp / "ema.safetensors", ema.state_dict())
        if optimizer is not None:
            atomic_torch_save(tmp / "optimizer.pt", optimizer.state_dict())
        atomic_write_json(tmp / "model.json", spec)
        files = [f for f, obj in (("ema.safetensors", ema), ("optimizer.pt", optimizer)) if obj is not None]
        # the files it holds: a checkpoint that lost one (e.g. optimizer.pt deleted) is incomplete
        atomic_write_json(tmp / "state.json", {"step": step, **(state or {}), "files": files})
        fsync_dir(tmp)
        if final.exists():  # an incomplete step_N (not made by this code): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    atomic_write_json(root / "latest.json", {"step": step, "dir": final.name})
    olds = [p for p in complete_checkpoints(root) if p != final and p.name < final.name]
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        _prune(p)
    return final


def latest_checkpoint(ckpt_root: str | os.PathLike, need: Sequence[str] = ()) -> Path:
    """Directory of the newest complete checkpoint (FileNotFoundError if there is none at all).

    A checkpoint is complete when it holds its weights, model.json, state.json, the files its
    state.json lists, and `need` (e.g. optimizer.pt, ema.safetensors for a resume). Uses
    latest.json; if it is missing, unreadable or names an incomplete directory, falls back to the
    newest complete step_N directory and warns. Checkpoints that exist but none complete are an
    error, never a silent fresh start.
    """
    root = Path(ckpt_root)
    pointer = root / "latest.json"
    problem = None
    found = complete_checkpoints(root, need)
    if pointer.is_file():
        try:
            path = root / json.loads(pointer.read_text())["dir"]
            missing = missing_files(path, need)
            if not missing:
                # a kill between publishing step_N and rewriting latest.json leaves the pointer one
                # checkpoint behind; the newer directory is complete (published by rename)
                return max([path, *found[-1:]], key=lambda p: p.name)
            problem = f"latest.json names {path.name}, which " + (
                "is missing" if not path.is_dir() else f"lacks {', '.join(missing)}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"latest.json is unreadable ({type(e).__name__}: {e})"
    if found:
        if problem:
            warnings.warn(f"{root}: {problem}; resuming from the newest complete checkpoint "
                          f"{found[-1].name}", stacklevel=2)
        return found[-1]
    if problem or any(root.glob("step_*")):
        raise CheckpointError(f"{root}: {problem or 'no complete checkpoint'}; no complete "
                              f"step_N directory to fall back to. Delete {root} to start afresh.")
    raise FileNotFoundError(f"no checkpoint under {root} (latest.json missing)")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, ema: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load weights (and EMA, optimizer) in place from a checkpoint directory; returns state.json."""
    path = Path(path)
    try:
        model.load_state_dict(load_safetensors(path / "model.safetensors"))
        if ema is not None and (path / "ema.safetensors").is_file():
            ema.load_state_dict(load_safetensors(path / "ema.safetensors"))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path} holds weights of another network than this run builds "
            f"({first[0] if first else e}...); use another run_dir or the same model settings"
        ) from None
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    return json.loads((path / "state.json").read_text())
