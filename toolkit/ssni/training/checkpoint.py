"""Training checkpoints: atomic directories of safetensors weights, JSON state, optimizer state.

Layout: <run>/checkpoints/step_00000500/{model,ema}.safetensors, model.json (how to rebuild the
network), state.json (step, extra), optimizer.pt (tensors and plain containers only, loadable with
torch.load(weights_only=True)); <run>/checkpoints/latest.json names the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..io import (atomic_save_safetensors, atomic_torch_save, atomic_write_json,
                  load_safetensors, safe_torch_load)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: nn.Module,
                    ema: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer],
                    spec: Dict[str, Any], state: Dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write a complete checkpoint directory atomically, point latest.json at it, prune old ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
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
    atomic_write_json(tmp / "state.json", {"step": step, **(state or {})})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_json(root / "latest.json", {"step": step, "dir": final.name})
    olds = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path:
    """Directory of the newest complete checkpoint (raises FileNotFoundError if none)."""
    root = Path(ckpt_root)
    pointer = root / "latest.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint under {root} (latest.json missing)")
    path = root / json.loads(pointer.read_text())["dir"]
    if not path.is_dir():
        raise FileNotFoundError(f"latest.json points at {path}, which is missing")
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, ema: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load weights (and EMA, optimizer) in place from a checkpoint directory; returns state.json."""
    path = Path(path)
    model.load_state_dict(load_safetensors(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_safetensors(path / "ema.safetensors"))
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    return json.loads((path / "state.json").read_text())
