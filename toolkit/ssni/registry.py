"""One small registry type shared by every family of pluggable parts (models, reweights, ...)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List


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
        required): a model variant's own defaults over its builder's, else the builder's signature."""
        import inspect

        obj, meta = self.get(name), self._meta[name]
        target = meta.get("builder_obj", obj)
        try:
            params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
        except (TypeError, ValueError):  # a builtin or an object without a signature
            return dict(meta.get("defaults", {}))
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        found = {k: p.default for k, p in params.items() if k != "self" and p.kind not in skip}
        return {**found, **meta.get("defaults", {})}

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
