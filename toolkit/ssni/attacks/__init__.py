"""Attacks: a registry of iterative attacks on [0,1] images, with EOT as a wrapper.

`ATTACKS.create(name, **kw)`; `EOT(attack, samples)` averages gradients over batched copies.
"""
from .apgd import APGD, apgd_checkpoints
from .base import ATTACKS, LOSSES, Attack, plain_gradient, project, random_start
from .eot import EOT, EOTGradient
from .pgd import PGD
from .transfer import Transfer

__all__ = ["ATTACKS", "LOSSES", "Attack", "APGD", "PGD", "Transfer", "EOT", "EOTGradient",
           "apgd_checkpoints", "plain_gradient", "project", "random_start"]
