"""ssni: diffusion-based adversarial purification with sample-specific noise injection (SSNI),
and typical-set (TS) training for robust denoisers and score networks.

Importing the package imports every module that registers something, so every registry (data
sets, noise samplers, models, samplers, reweights, attacks, attack views) is complete after
`import ssni`.
"""
from . import attacks, data, defense, denoise, evaluate, models, purify, scoring, training, typical  # noqa: F401  (register data sets and the TS noise sampler)  # noqa: F401  (register models, samplers, reweights)  # noqa: F401  (attacks, views)
from .defense import RobustClassifier, wrap_timm
from .diffusion import VPDiffusion, to_model_space, to_pixel_space
from .registry import Registry, UnknownNameError

__version__ = "0.1.0"
__all__ = ["VPDiffusion", "to_model_space", "to_pixel_space", "Registry", "UnknownNameError",
           "RobustClassifier", "wrap_timm"]
