"""Resumable evaluation state: one small JSON file per finished batch, written atomically.

The state is keyed on everything the results depend on: the resolved config and the fingerprints
of the weights (score network, classifier), the calibration, every defense's reweight and the images
and labels evaluated (their content: replacing the files under the same names is a change). Settings
that cannot change a result (progress, device, how the path of a fingerprinted file is spelled) are
left out, so changing them does not block a resume. A killed
evaluation, started again with the same inputs, reloads the finished batches and continues with the
first missing one; if any input changed, the old batches are refused with a message that says what
changed, instead of being reused.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

from ..io import atomic_write_json, read_json


class StaleStateError(ValueError):
    """A run directory holds evaluation results made from other inputs."""


def config_fingerprint(cfg: Any) -> str:
    """Stable hash of JSON-able data (a config, a calibration, reweight parameters)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_fingerprint(*tensors: Any) -> str:
    """Stable hash of tensors' dtypes, shapes and values (e.g. the images and labels a run reads)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def without(d: Dict[str, Any], keys: Any) -> Dict[str, Any]:
    """A copy of nested mapping d without the dotted `keys` (e.g. "data.root"); absent keys are skipped."""
    out = json.loads(json.dumps(d, default=str))
    for key in keys:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def slug(name: str) -> str:
    """A cell name as a file-system-safe folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class EvalState:
    """Per-(cell, batch) results under <run_dir>/state/, guarded by fingerprints of the inputs.

    parts: {name: fingerprint} of every input (e.g. "config", "score_model", "classifier",
    "calibration", "reweights"), or one string (the whole key).
    """

    def __init__(self, run_dir: str | Path, parts: Dict[str, str] | str):
        self.root = Path(run_dir) / "state"
        self.parts = {"key": parts} if isinstance(parts, str) else dict(parts)
        self.fingerprint = config_fingerprint(self.parts)
        self.reused = 0
        self.computed = 0  # batches finished (and saved) by this process
        meta = self.root / "fingerprint.json"
        if meta.is_file():
            old = read_json(meta, "evaluation state fingerprint")
            if not isinstance(old, dict) or old.get("fingerprint") != self.fingerprint:
                old_parts = old.get("parts", {}) if isinstance(old, dict) else {}
                changed = sorted(k for k in set(old_parts) | set(self.parts)
                                 if old_parts.get(k) != self.parts.get(k)) or ["the state format"]
                raise StaleStateError(
                    f"{self.root} holds results of a different evaluation config or inputs (changed: "
                    f"{', '.join(changed)}); refusing to reuse them. Use a new run_dir, or delete "
                    f"{self.root} to start afresh")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, {"fingerprint": self.fingerprint, "parts": self.parts})

    def _path(self, cell: str, batch: int) -> Path:
        return self.root / slug(cell) / f"batch_{batch:05d}.json"

    def get(self, cell: str, batch: int, count: bool = True) -> Optional[Dict[str, Any]]:
        """The saved result of a finished batch, or None (counted in `reused` unless count=False)."""
        p = self._path(cell, batch)
        if not p.is_file():
            return None
        self.reused += int(count)
        return read_json(p, "evaluation batch result")

    def put(self, cell: str, batch: int, result: Dict[str, Any]) -> None:
        """Save a finished batch atomically."""
        atomic_write_json(self._path(cell, batch), result)
        self.computed += 1
