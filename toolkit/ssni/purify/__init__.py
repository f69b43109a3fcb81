"""Diffusion purification with a per-sample t*: samplers, the Purifier module, gradient modes.

    from ssni.purify import Purifier, PurifierConfig, SAMPLERS, build_purifier
    p = build_purifier(score_model, PurifierConfig(sampler="ddpm", steps=20))
    out = p(x, t_star, seeds=seeds)   # x [B,C,H,W] in [0,1]; t_star float or Tensor[B]
"""
from .config import PurifierConfig, build_purifier, sampler_option_names
from .grads import GRAD_MODES
from .noise import NoiseStream
from .purifier import Purifier
from .samplers import SAMPLERS, Plan, Sampler, UnknownOptionError, build_sampler

__all__ = ["Purifier", "PurifierConfig", "SAMPLERS", "GRAD_MODES", "build_purifier",
           "build_sampler", "Sampler", "Plan", "NoiseStream", "UnknownOptionError",
           "sampler_option_names"]
