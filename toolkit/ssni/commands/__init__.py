"""Every `ssni <command>`: its Config dataclass and run function, registered in COMMANDS.

Nothing in the library imports this package; the CLI (ssni.cli) dispatches to it.
"""
from . import (calibrate, demo, evaluate, evaluate_denoiser, finetune, fit_reweight,  # noqa: F401
               purify, train_classifier, train_denoiser, train_score)
from .registry import COMMANDS, command

__all__ = ["COMMANDS", "command"]
