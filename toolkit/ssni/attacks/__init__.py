"""Attacks: a registry of iterative attacks on [0,1] images, with EOT as a wrapper, and the
attacks on denoisers. `ATTACKS.create(name, **kw)`; `EOT(attack, samples)` averages gradients over
batched copies. What an attack differentiates (a view of the defense) is `ssni.defense.VIEWS`.
"""
from .apgd import APGD, apgd_checkpoints
from .base import ATTACKS, LOSSES, Attack, plain_gradient
from .denoiser import DENOISER_ATTACKS, DenoisePGD, RandomPerturbation
from .eot import EOT, EOTGradient
from .geometry import project, project_delta, random_in_ball, random_start, steepest_step
from .pgd import PGD
from .transfer import Transfer

__all__ = ["ATTACKS", "LOSSES", "DENOISER_ATTACKS", "Attack", "APGD", "PGD", "Transfer", "EOT",
           "EOTGradient", "DenoisePGD", "RandomPerturbation", "apgd_checkpoints", "plain_gradient",
           "project", "project_delta", "random_in_ball", "random_start", "steepest_step"]
