"""timm classifiers: build by name (not pretrained by default) and save/load as checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from ..io import load_safetensors
from .factory import CHECKPOINT_FORMATS, weights_file
from .pretrained import load_state_checked, load_weights_file
from .robustbench_zoo import robustbench_classifier  # noqa: F401  (re-exported: older code imports it from here)


def create_classifier(name: str, in_chans: int, num_classes: int, image_size: int,
                      pretrained: bool = False, checkpoint: Optional[str] = None,
                      **kwargs: Any) -> nn.Module:
    """timm.create_model(name) with in_chans/num_classes from the data; optional local weights.

    `checkpoint` may be a .safetensors file or a torch file of plain tensors (weights_only).
    """
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = [m for m in timm.list_models() if name.split("_")[0] in m][:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {', '.join(close) or '-'} "
                         f"(see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans,
                                  num_classes=num_classes, **kwargs)
    except TypeError as e:  # a keyword the model does not take
        raise ValueError(f"timm model {name!r} does not take the keyword arguments {sorted(kwargs)} ({e}); "
                         "remove or rename them in the classifier's kwargs") from None
    if checkpoint:
        config = {"name": name, "in_chans": in_chans, "num_classes": num_classes, **kwargs}
        load_weights_file(model, checkpoint, "timm", config)  # another model's keys: one line
    model.model_name = name
    model.config = dict(name=name, in_chans=in_chans, num_classes=num_classes,
                        image_size=image_size, **kwargs)
    return model


def check_input_size(model: nn.Module, in_chans: int, image_size: int) -> None:
    """Raise a one-line ValueError when `model` cannot take [B, in_chans, image_size, image_size]
    images (e.g. a network whose downsampling needs more pixels), instead of failing mid-training."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"classifier {name} does not take {image_size}x{image_size} images ({reason}); "
                         f"set a larger data.image_size (e.g. 32) or choose another model.name") from None
    finally:
        model.train(was_training)


def classifier_spec(model: nn.Module) -> Dict[str, Any]:
    """JSON that rebuilds a classifier made by create_classifier."""
    cfg = dict(model.config)
    return {"format": "timm", "name": cfg.pop("name"), "config": cfg}


@CHECKPOINT_FORMATS.register("timm")
def _load_timm(path: Path, spec: Dict[str, Any], weights: str = "model") -> nn.Module:
    model = create_classifier(spec["name"], **spec["config"])
    file = weights_file(path, weights)
    load_state_checked(model, load_safetensors(file), "timm", spec, file)
    model.loaded_weights = file.stem
    return model
