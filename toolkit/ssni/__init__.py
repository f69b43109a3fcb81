"""ssni: diffusion-based adversarial purification with sample-specific noise injection (SSNI),
and typical-set (TS) training for robust denoisers and score networks.

Importing the package imports every module that registers something, so every registry (data
sets, noise samplers, models, samplers, reweights, attacks, attack views) is complete after
`import ssni`.
"""
from . import attacks, data, defense, denoise, evaluate, models, purify, scoring, training, typical  # noqa: F401  (register data sets and the TS noise sampler)  # noqa: F401  (register models, samplers, reweights)  # noqa: F401  (attacks, views)
from .attacks import APGD, EOT, PGD
from .data import DataConfig, build_dataset
from .defense import RobustClassifier, wrap_timm
from .diffusion import VPDiffusion, to_model_space, to_pixel_space
from .models import create_model, list_models, load_model, load_pretrained
from .purify import Purifier, PurifierConfig, build_purifier
from .registry import Registry, UnknownNameError
from .scoring import Calibration, ScoreNorm, ScoreNormConfig, build_reweight, calibrate

__version__ = "0.1.0"
# the few names a user needs without knowing the subpackages (the rest: ssni.<subpackage>)
__all__ = ["VPDiffusion", "to_model_space", "to_pixel_space", "Registry", "UnknownNameError",
           "RobustClassifier", "wrap_timm", "DataConfig", "build_dataset", "create_model", "list_models",
           "load_model", "load_pretrained", "Purifier", "PurifierConfig", "build_purifier", "Calibration",
           "ScoreNorm", "ScoreNormConfig", "build_reweight", "calibrate", "PGD", "APGD", "EOT"]
