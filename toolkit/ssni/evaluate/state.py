"""Resumable evaluation state: one small JSON file per finished batch, written atomically.

A killed evaluation, started again with the same config, reloads the finished batches and
continues with the first missing one; a different config in the same directory is an error.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

from ..io import atomic_write_json


def config_fingerprint(cfg: Dict[str, Any]) -> str:
    """Stable hash of the parts of a config that change results."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class EvalState:
    """Per-(cell, batch) results under <run_dir>/state/, guarded by a config fingerprint."""

    def __init__(self, run_dir: str | Path, fingerprint: str):
        self.root = Path(run_dir) / "state"
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "fingerprint.json"
        if meta.is_file():
            old = json.loads(meta.read_text())["fingerprint"]
            if old != fingerprint:
                raise ValueError(
                    f"{self.root} holds results of a different evaluation config "
                    f"(fingerprint {old}, now {fingerprint}); use a new run_dir or delete it")
        else:
            atomic_write_json(meta, {"fingerprint": fingerprint})

    def _path(self, cell: str, batch: int) -> Path:
        return self.root / _slug(cell) / f"batch_{batch:05d}.json"

    def get(self, cell: str, batch: int) -> Optional[Dict[str, Any]]:
        """The saved result of a finished batch, or None."""
        p = self._path(cell, batch)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, cell: str, batch: int, result: Dict[str, Any]) -> None:
        """Save a finished batch atomically."""
        atomic_write_json(self._path(cell, batch), result)
