"""Keyed, resumable, rank-sharded batch work: the one mechanism under `ssni evaluate` and `ssni fit-reweight`.

A job is `n` samples cut into batches of `batch_size`. Each finished batch is saved at once (a dict
of tensors as safetensors, anything else JSON-able as JSON) under root/<job>/, so a killed run
loses at most the batch it was computing. A store is guarded by keys of everything its results
depend on:

- one key for the whole store (`BatchStore(root, parts)`): results of other inputs are refused with
  a message naming what changed, never silently mixed or deleted;
- one key per job (`bind(job, key)`, a fit's attacked set, whose key includes the curve it
  attacked): each key has its own folder, so results of other inputs are never read;
- or both (an evaluation: the inputs every cell shares for the store, each cell's own defense and
  attack for its job), so a study can grow by a defense or an attack and keep every finished cell.

Under torchrun the batches are spread round robin over the ranks (`ssni.dist.owner`, counted over
every batch of the run, done or not) and every rank gets every batch's result back, in sample order;
a failure on any rank is raised on every rank. Per-sample or per-batch seeds (the caller's) make the
results independent of how the batches were spread.

Example:
    >>> import tempfile, torch
    >>> from ssni.dist import DistContext
    >>> store = BatchStore(tempfile.mkdtemp(), {"config": "abc"})
    >>> runner = BatchRunner(store, DistContext())
    >>> parts = runner.run("squares", 5, 2, lambda b: {"y": torch.arange(b.start, b.start + b.size) ** 2})
    >>> torch.cat([p["y"] for p in parts]).tolist(), store.computed
    ([0, 1, 4, 9, 16], 3)
    >>> _ = BatchRunner(store, DistContext()).run("squares", 5, 2, lambda b: 1 / 0)  # resumed: nothing computed
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor

from ..dist import DistContext, owner
from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .state import StaleStateError, config_fingerprint, slug


@dataclass(frozen=True)
class Batch:
    """One batch of a job: its number, its first sample and its size."""

    index: int
    start: int
    size: int

    @property
    def stop(self) -> int:
        """One past its last sample."""
        return self.start + self.size


def batches(n: int, batch_size: int) -> List[Batch]:
    """The batches of n samples, in order (the last one may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [Batch(i, a, min(batch_size, n - a)) for i, a in enumerate(range(0, n, batch_size))]


def _is_tensors(result: Any) -> bool:
    return isinstance(result, dict) and bool(result) and all(isinstance(v, Tensor) for v in result.values())


class BatchStore:
    """Finished batches under root/<job>/batch_XXXXX.{json,safetensors}, guarded by keys (module doc).

    parts: {name: fingerprint} of every input of the whole store (written to root/fingerprint.json and
    checked against it), or None when each job is bound to its own key with `bind`.
    """

    def __init__(self, root: str | Path, parts: Optional[Dict[str, str] | str] = None):
        self.root = Path(root)
        self.reused = 0  # batches read back from an earlier run
        self.computed = 0  # batches computed (and saved) by this process
        self._keys: Dict[str, str] = {}
        self.parts = None if parts is None else ({"key": parts} if isinstance(parts, str) else dict(parts))
        self.fingerprint = None if self.parts is None else config_fingerprint(self.parts)
        if self.parts is not None:
            self._check_fingerprint()

    def _check_fingerprint(self) -> None:
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

    def bind(self, job: str, key: str, keep_others: bool = False) -> None:
        """Give `job` its own key: its batches live in a folder of that key; folders of other keys of
        the same job (results of other inputs) are removed by the writing rank, or kept (keep_others)."""
        self._keys[job] = key
        folder = self.root / slug(job)
        if folder.is_dir() and not keep_others:
            for old in folder.iterdir():
                if old.is_dir() and old.name != key:
                    shutil.rmtree(old, ignore_errors=True)

    def _folder(self, job: str) -> Path:
        key = self._keys.get(job)
        if key is None and self.parts is None:
            raise KeyError(f"job {job!r} has no key: call bind(job, key) first (this store has no global key)")
        return self.root / slug(job) / key if key is not None else self.root / slug(job)

    def get(self, job: str, index: int, count: bool = True) -> Optional[Any]:
        """The saved result of a finished batch, or None (counted in `reused` unless count=False)."""
        stem = self._folder(job) / f"batch_{index:05d}"
        for suffix, load in ((".json", lambda p: read_json(p, "saved batch result")), (".safetensors", load_safetensors)):
            path = stem.with_suffix(suffix)
            if path.is_file():
                self.reused += int(count)
                return load(path)
        return None

    def put(self, job: str, index: int, result: Any) -> None:
        """Save a finished batch atomically (tensors as safetensors, anything else as JSON)."""
        self.computed += 1
        stem = self._folder(job) / f"batch_{index:05d}"
        if _is_tensors(result):
            atomic_save_safetensors(stem.with_suffix(".safetensors"),
                                    {k: v.detach().cpu().contiguous() for k, v in result.items()})
        else:
            atomic_write_json(stem.with_suffix(".json"), result)


class BatchRunner:
    """Runs jobs batch by batch on a BatchStore: skips saved batches, saves new ones, spreads batches
    over ranks and returns every batch's result on every rank."""

    def __init__(self, store: BatchStore, dist: DistContext, stop_after: Optional[int] = None):
        self.store, self.dist = store, dist
        self.stop_after = stop_after  # tests: stop (KeyboardInterrupt) after this many computed batches
        self._counter = 0  # running number of every batch of the run, done or not: picks its rank
        self._computed = 0

    def run(self, job: str, n: int, batch_size: int, compute: Callable[[Batch], Any],
            on_batch: Optional[Callable[[Batch], None]] = None, every: bool = False) -> List[Any]:
        """compute(batch) for each batch of n samples not already saved; [result per batch] in order.

        every: each rank runs every batch (for work split inside a batch, e.g. EOT copies across
        ranks); the main rank says whether a batch is done and alone writes it.
        """
        dist, parts, error = self.dist, {}, None
        world = dist.world_size
        for b in batches(n, batch_size):
            mine = every or owner(self._counter, world) == dist.rank
            self._counter += 1
            if mine and error is None:
                try:
                    parts[b.index] = self._one(job, b, compute, every)
                except Exception as e:  # noqa: BLE001  (raised on every rank below)
                    if world == 1:
                        raise
                    error = f"rank {dist.rank}: {type(e).__name__}: {e}"
            if on_batch is not None:
                on_batch(b)
        if world > 1 and not every:
            gathered = dist.all_gather_object((parts, error))
            errors = [err for _, err in gathered if err is not None]
            if errors:
                raise RuntimeError(f"{job} failed on {'; '.join(errors)}")
            parts = {i: r for part, _ in gathered for i, r in part.items()}
        elif error is not None:
            raise RuntimeError(f"{job} failed on {error}")
        missing = [b.index for b in batches(n, batch_size) if b.index not in parts]
        if missing:
            raise RuntimeError(f"{job}: batches {missing} have no result after every rank finished")
        return [parts[i] for i in sorted(parts)]

    def _one(self, job: str, b: Batch, compute: Callable[[Batch], Any], every: bool) -> Any:
        """One batch: its saved result, or computed and saved."""
        if every and self.dist.world_size > 1:  # the main rank decides, so every rank skips or runs it alike
            saved = self.dist.all_gather_object(self.store.get(job, b.index) if self.dist.is_main else None)[0]
        else:
            saved = self.store.get(job, b.index)
        if saved is not None:
            return saved
        result = compute(b)
        if not every or self.dist.is_main:
            self.store.put(job, b.index, result)
        self._computed += 1
        if self.stop_after is not None and self._computed >= self.stop_after:
            raise KeyboardInterrupt("stopped on request (stop_after_batches)")
        return result


class EvalState(BatchStore):
    """An evaluation's store: run_dir/state/<cell>/<cell key>/batch_XXXXX.json, under one key of the
    inputs every cell shares (`parts`) and, per cell, a key of its own defense and attack (`cells`).

    A state written before cells had keys (batches right under <cell>/, one key of the whole config,
    `legacy`) is moved into the per-cell layout when `legacy` matches it: the same config and inputs
    resume, and from then on the config may gain defenses and attacks. Only the main rank moves files.
    """

    def __init__(self, run_dir: str | Path, parts: Dict[str, str], cells: Dict[str, str],
                 legacy: Optional[Dict[str, str]] = None, dist: Optional[DistContext] = None):
        root = Path(run_dir) / "state"
        parts = {**parts, "layout": "cell-keys"}  # a legacy store can never match this
        dist = dist or DistContext()
        meta = root / "fingerprint.json"
        old = read_json(meta, "evaluation state fingerprint") if legacy is not None and meta.is_file() else None
        if isinstance(old, dict) and "layout" not in old.get("parts", {}):  # written before cells had keys
            if old.get("fingerprint") != config_fingerprint(legacy):
                changed = sorted(k for k in set(old.get("parts", {})) | set(legacy)
                                 if old.get("parts", {}).get(k) != legacy.get(k))
                raise StaleStateError(
                    f"{root} holds results of a different evaluation config or inputs (changed: "
                    f"{', '.join(changed)}), saved before each cell had its own key, so its cells cannot be "
                    "told apart; run once with the config that made it (its cells then move into their "
                    f"keys and the config may grow), use a new run_dir, or delete {root} to start afresh")
            if dist.is_main:
                self._migrate(root, cells)
                atomic_write_json(meta, {"fingerprint": config_fingerprint(parts), "parts": parts})
        dist.barrier()
        super().__init__(root, parts)
        for cell, key in cells.items():
            self.bind(cell, key, keep_others=True)

    @staticmethod
    def _migrate(root: Path, cells: Dict[str, str]) -> None:
        """Move each cell's batches of the legacy layout, and its saved adversarial images (run_dir/adv),
        into its key's folder (a rerun after a kill finishes the move: nothing is deleted)."""
        for cell, key in cells.items():
            for folder in (root / slug(cell), root.parent / "adv" / slug(cell)):
                saved = [p for p in folder.glob("batch_*") if p.is_file()] if folder.is_dir() else []
                if saved:
                    (folder / key).mkdir(parents=True, exist_ok=True)
                    for p in saved:
                        p.replace(folder / key / p.name)


@lru_cache(maxsize=8)
def _run_cell_keys(results: str, stamp: tuple) -> Dict[str, str]:
    """results.json's {cell: key}, read once per version of the file (`stamp`: its mtime and size)."""
    return read_json(Path(results), "evaluation results").get("cell_keys", {})


def _cell_key(run_dir: Path, cell: str) -> Optional[str]:
    """The key a finished run's results.json names for `cell`; None for a run from before cell keys
    (KeyError if the run names its cells and `cell` is not one)."""
    results = run_dir / "results.json"
    keys = {}
    if results.is_file():
        st = results.stat()
        keys = _run_cell_keys(str(results), (st.st_mtime_ns, st.st_size))
    if keys and cell not in keys:
        raise KeyError(f"{cell!r} is not a cell of the evaluation in {run_dir}; its cells: {sorted(keys)}")
    return keys.get(cell)


def saved_adversarial(run_dir: str | Path, cell: str, batch: Optional[int] = None) -> List[Dict[str, Tensor]]:
    """The adversarial images (`save_adversarial`) of one cell of the finished evaluation in run_dir, per
    batch in order: {x_adv [B,C,H,W], y [B]} ([] if none were saved); `batch`: only that batch's (a list
    of one, or [] when its images are not on this machine, e.g. a batch restored from another one)."""
    run_dir = Path(run_dir)
    key = _cell_key(run_dir, cell)
    folder = run_dir / "adv" / slug(cell)
    # a cell begun before adversarial images had key folders and finished after: its first batches
    # lie loose in the cell's folder, the rest under the key (the state's key: the same results)
    files = {p.name: p for p in folder.glob("batch_*.safetensors")}
    if key is not None:
        files.update({p.name: p for p in (folder / key).glob("batch_*.safetensors")})
    if batch is not None:
        files = {n: p for n, p in files.items() if n == f"batch_{batch:05d}.safetensors"}
    return [load_safetensors(files[name]) for name in sorted(files)]


def saved_cell(run_dir: str | Path, cell: str) -> List[Dict[str, Any]]:
    """The saved batches of one cell (`<defense>/<attack>`) of the finished evaluation in run_dir, in
    order ([] if it has none): the key its results.json names for the cell, else (a run finished
    before cells had keys) the batches right under the cell's folder."""
    run_dir = Path(run_dir)
    folder = run_dir / "state" / slug(cell)
    key = _cell_key(run_dir, cell)
    if key is not None:
        folder = folder / key
    return [read_json(p, "saved batch result") for p in sorted(folder.glob("batch_*.json"))]

