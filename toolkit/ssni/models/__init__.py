"""Networks and their factory: score networks (U-Nets, analytic), denoisers, timm classifiers, and
`load_network`, the one entry point for loading weights.

Importing this package registers every model variant and checkpoint format.
"""
from . import classifier, ddpmpp, diffusers_unet, dncnn, guided, pretrained, zoo  # noqa: F401  (register variants, formats)
from .base import TIME_INPUTS, EpsModel
from .classifier import check_input_size, classifier_spec, create_classifier
from .factory import (
                      CHECKPOINT_FORMATS,
                      MODELS,
                      WEIGHTS,
                      ModelConfig,
                      create_model,
                      list_models,
                      load_model,
                      model_spec,
                      register_model,
                      save_model,
                      weights_file,
                      weights_fingerprint,
)
from .load import load_network
from .pretrained import PRETRAINED_FORMATS, VPBackbone, load_pretrained
from .unet import UNet

__all__ = ["EpsModel", "UNet", "MODELS", "CHECKPOINT_FORMATS", "WEIGHTS", "ModelConfig",
           "create_model", "list_models", "load_model", "model_spec", "register_model", "save_model",
           "weights_file", "weights_fingerprint", "create_classifier", "classifier_spec", "check_input_size",
           "PRETRAINED_FORMATS", "TIME_INPUTS", "VPBackbone", "load_pretrained",
           "load_network"]
