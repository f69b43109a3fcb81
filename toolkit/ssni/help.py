"""What a user can set, printed by the toolkit itself: a command's keys (`ssni COMMAND --help`),
its resolved config (`--print-config`), and every registered part with its options (`ssni options`).

    >>> from ssni.help import config_keys
    >>> from ssni.data import DataConfig
    >>> [k for k, _, _, _ in config_keys(DataConfig)][:3]
    ['name', 'root', 'image_size']
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .config import to_dict
from .registry import REGISTRIES, Registry

COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_comments(cls: type) -> Dict[str, str]:
    """{field: the comment on its line} from a dataclass's source (the single place options are
    explained); {} when the source cannot be read."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's comment wins
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = COMMENT.match(line)
            if m and not line.lstrip().startswith("#"):
                out[m.group(1)] = m.group(2)
    return out


def _type_name(tp: Any) -> str:
    """A readable type: int, float, list[str], DataConfig, ..."""
    if isinstance(tp, type):
        return tp.__name__
    text = re.sub(r"<class '([^']+)'>", r"\1", str(tp)).replace("NoneType", "None")
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # typing.List[ssni.x.Spec] -> List[Spec]


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (built from its factory when it has one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


def config_keys(cls: type) -> List[Tuple[str, str, Any, str]]:
    """(key, type, default, description) of each top-level field of a config dataclass."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    return [(f.name, _type_name(hints[f.name]), _default(f), comments.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def _short(value: Any, limit: int = 60) -> str:
    """A default as it would be written in YAML, on one line, cut when long."""
    if dataclasses.is_dataclass(value):
        text = "{" + ", ".join(f.name for f in dataclasses.fields(value)) + "}"
    else:  # nested configs in lists become mappings; anything else its str
        plain = json.loads(json.dumps(value, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                                      else str(o)))
        text = yaml.safe_dump(plain, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_help(cls: type, command: str) -> str:
    """The keys a command takes, one a line: name, type, default and what it is."""
    lines = [f"keys of `ssni {command}` (set in the recipe or as key=value; nested keys with dots):"]
    for name, tp, default, what in config_keys(cls):
        lines.append(f"  {name:<20} {tp:<28} default {_short(default)}" + (f"  # {what}" if what else ""))
    # a number makes the clearest example (a path default may not exist where the user stands)
    scalars = sorted(((k, d) for k, tp, d, _ in config_keys(cls) if tp in ("int", "float", "str") and d != ""),
                     key=lambda kd: not isinstance(kd[1], (int, float)))
    if scalars:
        lines.append(f"example: ssni {command} RECIPE {scalars[0][0]}={_short(scalars[0][1])}")
    lines.append(f"resolved config: ssni {command} [RECIPE] [key=value ...] --print-config; registered parts "
                 "and their options: ssni options [KIND [NAME]]")
    return "\n".join(lines)


def print_config(cfg: Any) -> str:
    """A resolved config as the YAML a recipe would hold."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def find_registry(kind: str) -> Registry:
    """The registry of a kind ('sampler', 'attack', 'denoiser-attack' or 'denoiser attack', ...)."""
    key = kind.replace("-", " ").replace("_", " ")
    if key not in REGISTRIES:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(k.replace(' ', '-') for k in sorted(REGISTRIES))}")
    return REGISTRIES[key]


def options_text(kind: Optional[str] = None, name: Optional[str] = None) -> str:
    """`ssni options`: every kind with its names; a kind's names; or one entry's options and defaults."""
    if kind is None:
        return "\n".join(f"{k.replace(' ', '-'):<20} {', '.join(r.names())}" for k, r in sorted(REGISTRIES.items()))
    registry = find_registry(kind)
    if name is None:
        return f"{registry.kind}: {', '.join(registry.names())}"
    entry = registry.get(name)
    if dataclasses.is_dataclass(entry) and not isinstance(entry, type):  # a registered value (e.g. a ViewSpec)
        return f"{registry.kind} {name!r} is {entry!r}"
    options = registry.options(name)
    if not options:
        return f"{registry.kind} {name!r} takes no options"
    width = max(len(k) for k in options)
    return "\n".join([f"options of {registry.kind} {name!r} (default after each):"] + [
        f"  {k:<{width}}  {'(required)' if v is inspect.Parameter.empty else _short(v)}" for k, v in options.items()])
