"""Training: the DSM loss, the resumable loop, the process context, classifier and fine-tuning
pieces. Checkpoints live in ssni.checkpoint, noise samplers in ssni.noise."""
from ..dist import DistContext
from .loop import EpochBatches, LoopConfig, NonFiniteLossError, OptimConfig, Trainer
from .losses import DSMLoss, heldout_dsm_loss

__all__ = ["DistContext", "DSMLoss", "EpochBatches", "LoopConfig", "NonFiniteLossError",
           "OptimConfig", "Trainer", "heldout_dsm_loss"]
