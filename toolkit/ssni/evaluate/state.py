"""Keys of saved results: fingerprints of configs and tensors (the store itself: `jobs.py`).

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
from typing import Any, Dict


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
