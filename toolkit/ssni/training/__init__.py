"""Training: losses, the resumable loop, checkpoints, and the train-score / train-classifier jobs."""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .dist import DistContext
from .losses import NOISE_SAMPLERS, CrossEntropyLoss, DSMLoss, GaussianNoise
from .loop import EpochBatches, LoopConfig, NonFiniteLossError, OptimConfig, Trainer

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "DistContext",
           "NOISE_SAMPLERS", "CrossEntropyLoss", "DSMLoss", "GaussianNoise", "EpochBatches",
           "LoopConfig", "NonFiniteLossError", "OptimConfig", "Trainer"]
