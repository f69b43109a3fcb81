"""Honest evaluation of purification defenses: attacks through the purifier, metrics, checks."""
from .checks import epsilon_checks, gradient_check, randomness_check
from .jobs import EvalState, saved_adversarial, saved_cell
from .metrics import draw_accuracy, wilson_interval
from .state import StaleStateError, config_fingerprint

__all__ = ["epsilon_checks", "gradient_check", "randomness_check", "draw_accuracy",
           "wilson_interval", "EvalState", "saved_cell", "saved_adversarial", "StaleStateError", "config_fingerprint"]
