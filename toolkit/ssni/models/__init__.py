"""Score networks (U-Nets), denoisers, and the model factory."""
from . import zoo  # noqa: F401  (registers the variants)
from . import dncnn  # noqa: F401  (registers the denoisers)
from .base import EpsModel
from .factory import (CHECKPOINT_FORMATS, MODELS, create_model, list_models, load_model,
                      model_spec, register_model, save_model, weights_fingerprint)
from .unet import UNet

__all__ = ["EpsModel", "UNet", "MODELS", "CHECKPOINT_FORMATS", "create_model", "list_models",
           "load_model", "model_spec", "register_model", "save_model", "weights_fingerprint"]
from .classifier import classifier_spec, create_classifier  # noqa: E402

__all__ += ["create_classifier", "classifier_spec"]
