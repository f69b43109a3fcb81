"""Every `ssni <command>`: its Config dataclass and run function, registered in COMMANDS.

Nothing in the library imports this package; the CLI (ssni.cli) dispatches to it.
"""
from . import (  # noqa: F401
               calibrate,
               demo,
               evaluate,
               evaluate_denoiser,
               finetune,
               fit_reweight,
               purify,
               train_classifier,
               train_denoiser,
               train_score,
)
from .registry import COMMANDS, command

__all__ = ["COMMANDS", "command"]
