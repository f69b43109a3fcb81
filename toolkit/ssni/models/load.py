"""One entry point for "load these weights": `load_network`, and the score / classifier loaders on top of it.

What it takes: an ssni run or checkpoint directory, a weights file, a public checkpoint
{format: ..., path: ..., options} (PRETRAINED_FORMATS), or a module (returned as is). `kind` says
what the caller needs ("score" or "classifier"); anything else loaded is a one-line ValueError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ..config import setting
from .classifier import create_classifier
from .factory import load_model
from .pretrained import load_pretrained, load_weights_file
from .robustbench_zoo import robustbench_classifier

NetworkRef = Union[str, os.PathLike, Dict[str, Any], nn.Module]

# kind -> (what it is called, what the caller should have given instead)
KINDS = {
    "score": ("a score network", "a `ssni train-score` run or checkpoint directory, or a public checkpoint "
              "{format: ..., path: ...}"),
    "classifier": ("a classifier", "a `ssni train-classifier` run or checkpoint directory, or a weights file "
                   "of classifier.name"),
}


def kind_of(model: nn.Module) -> Optional[str]:
    """A loaded network's kind: "score" (it has a diffusion), "classifier" (its config has num_classes), or None."""
    if hasattr(model, "diffusion"):
        return "score"
    if "num_classes" in (getattr(model, "config", None) or {}):
        return "classifier"
    return None


def _what(model: nn.Module) -> str:
    """A loaded network in a few words, e.g. "a classifier (resnet10t)" or "a score network (unet_tiny)"."""
    found = kind_of(model)
    kind = KINDS[found][0] if found else "a network"
    return f"{kind} ({getattr(model, 'model_name', None) or getattr(model, 'name', None) or type(model).__name__})"


def _format_of(model: nn.Module) -> str:
    """The format name a mismatch message gives a module's weights (as classifier_spec / model_spec write it)."""
    if any(isinstance(getattr(model, a, None), dict) for a in ("pretrained_cfg", "default_cfg")):
        return "timm"
    return "ssni" if getattr(model, "model_name", None) else type(model).__name__


def _load_file(path: Path, into: Optional[nn.Module], name: str) -> nn.Module:
    """A weights file into `into`, or (no `into`) the ssni checkpoint it belongs to (model.json beside it)."""
    if into is not None:
        load_weights_file(into, path, _format_of(into), dict(getattr(into, "config", None) or {}))
        return into.eval()
    if path.stem in ("ema", "model") and (path.parent / "model.json").is_file():
        return load_model(path.parent, weights=path.stem)  # the file names the weights; `weights` is moot
    raise ValueError(f"{name} is a weights file with no ssni model.json beside it; pass into=<the network it "
                     f"belongs to>, or give its checkpoint directory")


def load_network(ref: NetworkRef, *, kind: Optional[str] = None, weights: str = "auto",
                 into: Optional[nn.Module] = None, label: str = "") -> nn.Module:
    """A network (eval mode) from wherever its weights are; a module is returned as is, unchecked.

    ref: an ssni checkpoint directory or run directory (checkpoints/latest.json; `weights` picks
    auto = EMA when present | ema | model), a weights file (filled into `into`, or else read with the
    model.json beside it), or a public checkpoint {format, path, **options} (ssni.models.load_pretrained;
    its own options choose its weights). `kind` ("score" | "classifier") checks what was loaded;
    `label` names the setting in error messages (e.g. "score_model").

    Examples:

        >>> import tempfile
        >>> from ssni.models import create_model, load_network, save_model
        >>> folder = save_model(tempfile.mkdtemp(), create_model("unet_tiny"))
        >>> load_network(folder, kind="score").input_shape          # a checkpoint directory
        (1, 8, 8)
        >>> load_network(folder, kind="classifier")
        Traceback (most recent call last):
        ValueError: ... holds a score network (unet_tiny), not a classifier; expected ...
        >>> net = load_network(folder / "model.safetensors", into=create_model("unet_tiny"))  # a weights file
        >>> load_network(net) is net                                # a module passes through
        True
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
    if isinstance(ref, nn.Module):
        return ref
    name = f"{label} {ref}" if label else str(ref)
    if into is not None and (isinstance(ref, dict) or Path(ref).is_dir()):
        raise ValueError(f"into= is for a weights file, but {name} is not a file; leave into unset")
    if isinstance(ref, dict):
        opts = dict(ref)
        if "format" not in opts or "path" not in opts:
            raise ValueError(f"{name} must name format and path (e.g. {{format: score_sde, path: checkpoint_8.pth}}), "
                             f"or be an ssni checkpoint directory")
        model = load_pretrained(opts.pop("path"), opts.pop("format"), **opts)
    elif Path(ref).is_file() or into is not None:
        model = _load_file(Path(ref), into, name)
    else:  # a directory, or a path that does not exist (load_model says so)
        model = load_model(ref, weights=weights)
    if kind is not None and kind_of(model) != kind:
        raise ValueError(f"{name} holds {_what(model)}, not {KINDS[kind][0]}; expected {KINDS[kind][1]}")
    return model


def load_score_model(spec: NetworkRef, weights: str = "auto") -> nn.Module:
    """A score network (x [B,C,H,W], t [B] -> eps [B,C,H,W]): load_network(spec, kind="score")."""
    return load_network(spec, kind="score", weights=weights, label="score_model")


@dataclass
class ClassifierRef:
    """Where the classifier comes from: a checkpoint/run directory, a timm name, or RobustBench.

    source "robustbench": `name` is a RobustBench model (e.g. Standard, the WideResNet-28-10) and
    kwargs give model_dir (where RobustBench keeps its files), dataset and threat_model; such a
    model normalises itself, so set the defense's input_size (32 for CIFAR-10) and leave mean/std
    null.
    """

    source: str = "timm"  # timm | robustbench
    name: str = "resnet18"
    checkpoint: Optional[str] = None  # run dir or checkpoint dir (train-classifier) or weights file
    weights: str = "auto"  # for run/checkpoint dirs: auto (EMA when present) | ema | model
    pretrained: bool = False
    in_chans: Optional[int] = setting(None, ge=1)  # default: the score model's channels
    num_classes: int = setting(10, ge=2)
    kwargs: Dict[str, Any] = field(default_factory=dict)


def load_classifier(ref: ClassifierRef, in_chans: int, image_size: int) -> nn.Module:
    """A classifier (x [B,C,H,W] -> logits [B,n]) from a run/checkpoint directory, a weights file of
    ref.name, a fresh timm model, or RobustBench."""
    if ref.source == "robustbench":
        return robustbench_classifier(ref.name, **ref.kwargs)
    if ref.source != "timm":
        raise ValueError(f"classifier.source must be timm or robustbench, got {ref.source!r}")
    if ref.checkpoint and Path(ref.checkpoint).is_dir():  # the directory knows its architecture
        return load_network(ref.checkpoint, kind="classifier", weights=ref.weights, label="classifier.checkpoint")
    model = create_classifier(ref.name, in_chans=ref.in_chans or in_chans, num_classes=ref.num_classes,
                              image_size=image_size, pretrained=ref.pretrained, **ref.kwargs)
    if ref.checkpoint:  # a weights file of ref.name's architecture
        model = load_network(ref.checkpoint, kind="classifier", into=model, label="classifier.checkpoint")
    return model


__all__ = ["KINDS", "ClassifierRef", "NetworkRef", "kind_of", "load_classifier", "load_network", "load_score_model"]
