"""Attacks: a registry of iterative attacks on [0,1] images, with EOT as a wrapper, and the
attacks on denoisers. `ATTACKS.create(name, **kw)`; `EOT(attack, samples)` averages gradients over
batched copies (`selective=True`: only over the draws that still resist); `per_step(attack)` takes
its loss at every reverse step of the purification (perstep.py). Attacks also follow
torchattacks' convention, `PGD(model, eps=..., alpha=..., steps=...)(x, y)`, and take `targeted=True`.
What an attack differentiates (a view of the defense) is `ssni.defense.VIEWS`. `lownoise` also lowers
the defense's t*(x) (lownoise.py); `autoattack` runs the AutoAttack package on a view (autoattack.py,
the optional extra `ssni[autoattack]`).
"""
from .apgd import APGD, apgd_checkpoints
from .autoattack import AutoAttackClient
from .base import ATTACKS, LOSSES, Attack, plain_gradient, targeted_loss, uses_t_star
from .denoiser import DENOISER_ATTACKS, DenoisePGD, RandomPerturbation
from .eot import EOT, EOTGradient, SelectiveEOTGradient
from .geometry import project, project_delta, random_in_ball, random_start, steepest_step
from .lownoise import LowNoise, keep_fooled_loss, t_star_loss
from .perstep import per_step, per_step_gradient
from .pgd import PGD, LowFreqPGD
from .transfer import Transfer

__all__ = ["ATTACKS", "LOSSES", "DENOISER_ATTACKS", "Attack", "APGD", "PGD", "LowFreqPGD", "Transfer",
           "LowNoise", "AutoAttackClient", "t_star_loss", "keep_fooled_loss", "uses_t_star",
           "EOT", "EOTGradient", "SelectiveEOTGradient", "DenoisePGD", "RandomPerturbation",
           "apgd_checkpoints", "plain_gradient", "targeted_loss", "project", "project_delta",
           "random_in_ball", "random_start", "steepest_step", "per_step", "per_step_gradient"]
