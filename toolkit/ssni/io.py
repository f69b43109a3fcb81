"""Atomic file writes and safe tensor loading (safetensors / weights_only)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process's umask, applied to files made by mkstemp (0600)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write via `write(tmp)` into a temp file beside `path`, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: a later run removes what a killed one left (remove_stale_temps)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs now (our own pid counts as dead: we are not writing its leftovers)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


_TEMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")  # what _atomic makes: .<name>.<pid>.<random>.tmp


def remove_stale_temps(root: str | os.PathLike, depth: int = 2) -> List[Path]:
    """Remove the temp files of atomic writes under root (and `depth` levels of folders below) whose
    writer no longer runs (killed mid-write); returns what was removed."""
    removed: List[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = _TEMP.match(entry.name)
        if m and entry.is_file() and not pid_alive(int(m.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif depth > 0 and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temps(entry, depth - 1)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes via a temp file and rename, so readers never see a half-written file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temp file and rename, so readers never see a half-written file."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", default_name: str | None = None,
              hint: str = "") -> Any:
    """Read a JSON file (or `default_name` inside a directory) with one-line errors that name it.

    Missing: FileNotFoundError; unreadable or not JSON (e.g. truncated): ValueError. `hint` says
    how to make the file again.
    """
    path = Path(path)
    if default_name is not None and path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{f' ({hint})' if hint else ''}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); it may be "
                         f"truncated{f': {hint}' if hint else ''}") from None


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically torch.save plain tensors/containers (loadable with weights_only=True)."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(path: str | os.PathLike, tensors: Dict[str, torch.Tensor],
                            metadata: Dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (tensors are made contiguous and detached)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors, containers and numpy scalars."""


def _numpy_scalar_globals() -> List[Any]:
    """What a pickled numpy scalar or dtype needs, for torch's weights-only unpickler.

    A numpy scalar pickles as `scalar(dtype, bytes)` and a dtype as `dtype(code, ...)` plus a
    BUILD of its state, so the allowlist is numpy's `scalar` (under numpy 1.x's name
    numpy.core.multiarray.scalar and 2.x's numpy._core.multiarray.scalar: public checkpoints such as
    score_sde's were written with numpy 1.x), `numpy.dtype`, and the dtype classes of the fixed-size
    types (not object or void). Nothing here can call code: the values are data.
    """
    try:
        import numpy as np
    except ImportError:  # no numpy, no numpy scalars in what we could read
        return []
    scalar = np.float64(0).__reduce__()[0]  # numpy's own scalar constructor, whichever module holds it
    found: List[Any] = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for code in np.typecodes["All"]:
        if code not in "OV":
            cls = type(np.dtype(code))
            if cls not in found:
                found.append(cls)
    return found


@contextlib.contextmanager
def _allow_numpy_scalars() -> Iterator[None]:
    """numpy scalars and dtypes allowlisted for torch.load(weights_only=True), for this block only.

    Globals the caller had already allowlisted are left alone (torch's context manager removes
    what it added on exit, so only the missing ones go through it).
    """
    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals"):  # torch < 2.5: weights_only knows no allowlist
        yield
        return
    present = list(serialization.get_safe_globals())
    missing = [g for g in _numpy_scalar_globals() if g not in present]
    with serialization.safe_globals(missing):
        yield


_REFUSED = (  # how torch's weights-only unpickler names what it refused
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function <?(?:built-in function |function )?([\w.]+)"),
)


def refused_global(error: BaseException) -> str:
    """The Python object a weights-only load refused, from torch's message ("an object" if unnamed)."""
    text = str(error)
    for pattern in _REFUSED:
        found = pattern.search(text)
        if found:
            name = found.group(1).rstrip(".,")
            return name if "." in name else f"builtins.{name}"  # torch drops the `builtins.` of builtins
    return "an object it cannot read without running code"


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; pickled code is refused, a corrupt file is a ValueError.

    Tensors, containers, plain Python values and numpy scalars / dtypes (what public checkpoints'
    optimizer states hold, e.g. score_sde's numpy learning rate) are read; any other pickled object
    is refused with an UnsafeCheckpointError that names it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"torch file not found: {path}")
    try:
        with _allow_numpy_scalars():
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch raises UnpicklingError (wrapped) for disallowed globals
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__ or "GLOBAL" in str(e):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds the Python object {refused_global(e)}, not tensors "
                f"(weights-only reading takes tensors, containers and numpy scalars; other objects could run code)"
            ) from e
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # torch adds paragraphs
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{path} is not a readable torch file ({why}); it may be truncated (an "
                         f"interrupted copy or save): copy or save it again") from None


def load_safetensors(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors; a truncated or corrupt file is a one-line ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e}); it may be truncated "
                         f"(an interrupted copy or save): copy or save it again") from None
