"""Typed configs: nested dataclasses loaded from YAML recipes plus `key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar

import yaml

from .io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


def yaml_error_message(e: yaml.YAMLError, what: str) -> str:
    """A YAML error in `what` (a recipe file or an override) as one line: what is wrong and where."""
    problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(e, DuplicateKeyError):
        return f"{what}: {problem}; give each key once (YAML would silently keep only the last)"
    if isinstance(e, yaml.constructor.ConstructorError) and "tag:yaml.org,2002:python/" in problem:
        tag = problem.split("tag:yaml.org,2002:", 1)[1].rstrip("'\" ")
        return (f"{what}: Python tags are not allowed in recipes (found !!{tag}{where}); recipes and "
                f"overrides hold plain values only: numbers, strings, lists, mappings")
    context = getattr(e, "context", None)
    return f"{what} is not valid YAML: {f'{context}: ' if context else ''}{problem}{where}"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping in YAML text that gives the same key twice."""


def _line(mark: Any, other: Any) -> str:
    """'line N' of a YAML mark, with the column when `other` is on the same line (a one-line override)."""
    return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if mark.line == other.line else "")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain values only) that reads numbers as people write them (2e-4, 1E-3,
    -3e5: YAML 1.1 needs a dot and a signed exponent, so it reads these as strings) and refuses a
    mapping that gives a key twice (else the last one silently wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not key_node.start_mark:
                raise DuplicateKeyError(None, None, f"duplicate key {key!r} at {_line(key_node.start_mark, first)} "
                                        f"(first at {_line(first, key_node.start_mark)})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# decimal numbers with an exponent, with or without a dot or an exponent sign (YAML 1.2's float)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _safe_load(text: Any, what: str) -> Any:
    """Safe YAML loading (RecipeLoader) with a one-line ConfigError naming `what`."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: plain values only, never Python objects
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(e, what)) from None


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """Turn ['a.b=1', 'c=[1,2]'] into a nested dict; values are parsed as YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        value = _safe_load(raw, f"override {item!r}") if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; `extra` wins. Integer keys address list items (`attacks.0.eot=2`)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), list) and v \
                and all(str(i).lstrip("-").isdigit() for i in v):
            out[k] = _merge_list(out[k], v, str(k))
        else:
            out[k] = v
    return out


def _merge_list(items: List[Any], extra: Mapping[Any, Any], where: str) -> List[Any]:
    """Apply {index: value} to a copy of a list; mappings merge into mapping items."""
    out = list(items)
    for i, v in extra.items():
        idx = int(i)
        if not -len(out) <= idx < len(out):
            raise ConfigError(f"override {where}.{i}: index out of range, {where} has "
                              f"{len(out)} items (valid indices 0..{len(out) - 1})")
        if isinstance(v, Mapping) and isinstance(out[idx], Mapping):
            out[idx] = merge(dict(out[idx]), v)
        else:
            out[idx] = v
    return out


@dataclasses.dataclass(frozen=True)
class Bound:
    """The valid values of a numeric setting: a finite number (an integer if `integer`) inside an
    interval whose ends may be open; `means` says what an edge value means (e.g. "0: no clipping")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    means: str = ""

    def text(self) -> str:
        """The range in words, e.g. '>= 1', '> 0', 'in (0, 1)'."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"

    def inside(self, v: float) -> bool:
        """Whether the finite number v lies in the interval."""
        lo = self.low is None or (v > self.low if self.low_open else v >= self.low)
        hi = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return lo and hi

    def check(self, value: Any, key: str) -> Any:
        """`value` unchanged when it is valid, else a one-line ConfigError naming `key` and the range."""
        def refuse(kind: str) -> ConfigError:
            limits = "" if self.text() == "finite" else " " + self.text()
            means = f" ({self.means})" if self.means else ""
            return ConfigError(f"{key} must be {kind}{limits.lstrip() if not kind else limits}{means}, got {value!r}")

        # numpy scalars and 0-d tensors count (the Python API gets them), text and booleans do not
        number = not isinstance(value, (bool, str, bytes)) and hasattr(type(value), "__float__")
        try:
            v = float(value) if number else math.nan
        except (TypeError, ValueError):  # e.g. a tensor of several values
            number, v = False, math.nan
        if not number or (self.integer and not (math.isfinite(v) and v.is_integer())):
            raise refuse("an integer" if self.integer else "a number")
        if not math.isfinite(v):
            raise refuse("a finite number")
        if not self.inside(v):
            raise refuse("")
        return value


def bound(ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
          lt: Optional[float] = None, integer: bool = False, means: str = "") -> Bound:
    """A Bound from pydantic-style limits: ge / gt (low end), le / lt (high end)."""
    return Bound(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                 low_open=gt is not None, high_open=lt is not None, integer=integer, means=means)


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            directory: bool = False, **limits: Any) -> Any:
    """A dataclass field whose value `from_dict` checks: numeric limits (see `bound`; applied to each
    item of a list), or with `directory`, a path that is not empty and not an existing file."""
    meta: Dict[str, Any] = {}
    if limits:
        meta["bound"] = bound(**limits)
    if directory:
        meta["directory"] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _check_directory(value: Any, key: str) -> None:
    """An output directory setting: not empty (that would write into the current directory), not a file."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{key} is empty; expected a directory path (e.g. {key}=runs/my-run)")
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value} is an existing file; expected a directory (a new or existing folder)")


def check_settings(obj: Any, where: str = "config") -> None:
    """Check every field of dataclass `obj` declared with `setting` (limits, directories); one-line
    ConfigError naming the key (prefixed by `where` unless it is the top level)."""
    for f in dataclasses.fields(obj):
        key = f.name if where == "config" else f"{where}.{f.name}"
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.metadata.get("directory"):
            _check_directory(value, key)
        b = f.metadata.get("bound")
        if b is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            for i, v in enumerate(items):
                whole = isinstance(v, int) and not isinstance(v, bool)  # an int field: say "an integer"
                (dataclasses.replace(b, integer=True) if whole else b).check(
                    v, key if items is not value else f"{key}[{i}]")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:  # Optional[X]: X's own error names the key that is wrong
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} fits none of {args}")
    if origin in (list, List, tuple, typing.Tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan: no setting means that
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got null")
        if isinstance(value, (bool, Mapping, list, tuple)):  # str() of these is never what was meant
            hint = " (YAML reads yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""
            raise ConfigError(f"{where}: expected a string, got {value!r}{hint}")
        return str(value)
    return value


def from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors that list valid keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0] if where == "config" else f"{where}.{unknown[0]}"
        scope = "" if where == "config" else f" of {where}"
        raise ConfigError(
            f"unknown config key {key!r}; valid keys{scope}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where != "config" else name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{where}: {e}") from e
    check_settings(obj, where)
    return obj


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Dataclass -> plain dict (lists for tuples), suitable for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load_config(cls: Type[T], recipe: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (optional), apply overrides, and build the typed config."""
    data: Dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path} (expected a YAML file, see recipes/)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {path} is not a UTF-8 text file ({e.reason} at byte "
                              f"{e.start}); expected a YAML recipe") from None
        loaded = _safe_load(text, f"recipe {path}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"recipe {path} must hold a mapping at the top level")
        # a run's saved config.yaml works as a recipe: its runtime record is not a setting
        data = {k: v for k, v in loaded.items() if k != RUNTIME_KEY}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


# config.yaml's record of what the run ran with (not a setting: loading a saved config skips it)
RUNTIME_KEY = "runtime"


def runtime_info() -> Dict[str, Any]:
    """What a run's numbers depend on besides its config: CPU threads, the CPU kernels torch chose
    (e.g. AVX512, AVX2: the same recipe trains other weights on another machine) and library versions."""
    import platform

    import torch

    return {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "torch": str(torch.__version__), "python": platform.python_version()}


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (atomically), with a `runtime` record."""
    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump({**to_dict(cfg), RUNTIME_KEY: runtime_info()}, sort_keys=False))
    return path


def read_run_config(run_dir: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The config a command saved in run_dir (config.yaml) as a mapping; None when there is none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    loaded = _safe_load(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return {k: v for k, v in loaded.items() if k != RUNTIME_KEY}


def read_run_runtime(run_dir: str | os.PathLike) -> Dict[str, Any]:
    """The `runtime` record of run_dir's config.yaml ({} when there is none)."""
    path = Path(run_dir) / "config.yaml"
    loaded = _safe_load(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None
    record = loaded.get(RUNTIME_KEY) if isinstance(loaded, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else {}


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{'a.b': v} for nested mappings (lists stay values)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


# where a run is written, how long, how often it logs/saves/samples and on which device: a resumed run
# may change these without mixing two runs
SAME_RUN_MAY_DIFFER = ("run_dir", "output", "progress", "device", "loop.steps", "loop.progress", "loop.device",
                       "loop.log_every", "loop.ckpt_every", "loop.sample_every", "loop.keep_checkpoints")


def check_same_run(cfg: Any, run_dir: str | os.PathLike, marker: str,
                   may_differ: Sequence[str] = SAME_RUN_MAY_DIFFER) -> None:
    """Raise when run_dir already holds work (`marker` exists in it) made with another config than
    cfg: resuming or reusing it would mix two runs. Keys in `may_differ` do not count."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if not (run_dir / marker).exists() or saved is None:
        return
    try:  # through the dataclass, so fields added since get their defaults on both sides
        old = _flat(to_dict(from_dict(type(cfg), saved)))
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a run whose config no longer loads ({e}); use a new run "
                          "directory or delete this one") from None
    new = _flat(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if k not in may_differ and old.get(k) != new.get(k)]
    warn_other_threads(run_dir)
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"{run_dir} holds a run made with another config ({shown}{more}); reusing it would "
                          "mix the two: use a new run directory or delete this one")


def warn_other_threads(run_dir: str | os.PathLike) -> None:
    """Say so when work in run_dir was made with another CPU thread count than this process uses:
    resuming is fine, but the result then matches an uninterrupted run only to float tolerance."""
    import sys

    import torch

    before = read_run_runtime(run_dir).get("threads")
    if before is not None and before != torch.get_num_threads():
        print(f"[ssni] note: {run_dir} was started with {before} CPU threads, this process uses "
              f"{torch.get_num_threads()} (SSNI_THREADS): results agree with an uninterrupted run only "
              "to floating-point tolerance", file=sys.stderr)
