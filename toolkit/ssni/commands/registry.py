"""The registry of `ssni` commands: each maps a name to its Config dataclass and run function."""
from __future__ import annotations

from typing import Any, Callable, Type

from ..registry import Registry

COMMANDS = Registry("command")


def command(name: str, config: Type[Any], help: str) -> Callable[[Callable], Callable]:
    """Decorator registering `run(cfg) -> summary` as `ssni <name>` with its config class."""

    def deco(run: Callable) -> Callable:
        COMMANDS.add(name, run, config=config, help=help)
        return run

    return deco
