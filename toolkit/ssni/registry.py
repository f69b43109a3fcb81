"""One small registry type shared by every family of pluggable parts (models, reweights, ...)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List

_EMPTY = inspect.Parameter.empty


class UnknownOptionError(ValueError):
    """Raised when an option is not one a registered entry takes; the message lists those it does."""


class UnknownNameError(KeyError):
    """Raised when a name is not registered; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _choices_message(kind: str, name: str, choices: Iterable[str]) -> str:
    return f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(choices)) or '(none)'}"


# every registry by its kind, so a user can list what is registered (`ssni options`)
REGISTRIES: Dict[str, "Registry"] = {}


class Registry:
    """Maps names to builders: `register` (decorator), `get`, `names`, `create`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Any] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}
        REGISTRIES.setdefault(kind, self)

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Any], Any]:
        """Decorator registering a class or function under `name` (default: its __name__)."""

        def deco(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    def add(self, name: str, obj: Any, **meta: Any) -> None:
        """Register `obj` under `name` without a decorator."""
        self.register(name, **meta)(obj)

    def get(self, name: str) -> Any:
        """Return the registered object; unknown names raise UnknownNameError listing choices."""
        if name not in self._items:
            raise UnknownNameError(_choices_message(self.kind, name, self._items))
        return self._items[name]

    def meta(self, name: str) -> Dict[str, Any]:
        """Metadata given at registration (e.g. tags such as test=True)."""
        self.get(name)
        return dict(self._meta[name])

    def create(self, name: str, **kwargs: Any) -> Any:
        """Call the registered builder with keyword arguments."""
        return self.get(name)(**kwargs)

    def options(self, name: str) -> Dict[str, Any]:
        """The keyword options of entry `name` with their defaults (`inspect.Parameter.empty` when
        required): a model variant's own defaults over its builder's; for a class, its __init__'s
        and, where that passes **kwargs on, its bases' too."""
        found, _ = self._signature_options(name)
        return {**found, **self._meta[name].get("defaults", {})}

    def _signature_options(self, name: str) -> tuple:
        """({option: default}, whether the builder still takes any keyword) of entry `name`."""
        import inspect

        obj = self.get(name)  # an unknown name: UnknownNameError listing the choices
        target = self._meta[name].get("builder_obj", obj)
        chain = [k.__init__ for k in inspect.getmro(target) if "__init__" in vars(k)] if inspect.isclass(target) \
            else [target]
        found: Dict[str, Any] = {}
        open_ended = True
        for fn in chain:
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):  # a builtin without a signature: nothing more to learn
                break
            for k, p in params.items():
                if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    found.setdefault(k, p.default)
            open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
            if not open_ended:
                break
        return found, open_ended and not inspect.isclass(target)

    def check_options(self, name: str, given: Any, where: str, internal: tuple = ()) -> None:
        """Raise a one-line UnknownOptionError when `given` (a mapping of options) holds one that entry
        `name` does not take, listing those it does with their defaults; an unknown name raises
        UnknownNameError. `internal`: options the toolkit fills in itself (not listed)."""
        found, open_ended = self._signature_options(name)  # an unknown name raises there
        options = {**found, **self._meta[name].get("defaults", {})}
        unknown = sorted(k for k in given if k not in options)
        if unknown and not open_ended:
            shown = ", ".join(f"{k}={'(required)' if v is _EMPTY else v!r}" for k, v in options.items()
                              if k not in internal)
            raise UnknownOptionError(f"{where}: {self.kind} {name!r} has no option {unknown[0]!r}; its options: "
                                     f"{shown or '(none)'}")

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
