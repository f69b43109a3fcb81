"""Model registry, `create_model`, and checkpoint I/O (safetensors weights + JSON config)."""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

from torch import nn

from ..checkpoint import latest_checkpoint
from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from ..registry import Registry
from .pretrained import load_state_checked

MODELS = Registry("model")
CHECKPOINT_FORMATS = Registry("checkpoint format")
WEIGHTS = ("auto", "ema", "model")


@dataclass
class ModelConfig:
    """A registered model name plus keyword overrides of its defaults."""

    name: str = "unet_digits"
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        MODELS.check_options(self.name, self.kwargs, "model.kwargs")  # when the recipe loads


def register_model(name: str, builder: Callable[..., nn.Module], defaults: Dict[str, Any],
                   **meta: Any) -> None:
    """Register a variant: a builder class/function and its default keyword arguments."""

    params = inspect.signature(builder).parameters
    options = [k for k, v in params.items() if k != "self" and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]

    def make(**kw: Any) -> nn.Module:
        unknown = sorted(k for k in kw if k not in options)
        if unknown:
            raise ValueError(f"model {name!r} has no option {unknown[0]!r}; its options: {', '.join(options)}")
        return builder(**{**defaults, **kw})

    make.__doc__ = f"{name}: {builder.__name__} with defaults {defaults}"
    MODELS.add(name, make, builder=builder.__name__, builder_obj=builder, defaults=dict(defaults), **meta)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model variant; keyword arguments override its defaults."""
    model = MODELS.create(name, **kwargs)
    model.model_name = name
    return model


def list_models(kind: str | None = None) -> List[str]:
    """Registered model names, optionally only those whose `kind` metadata matches."""
    return [n for n in MODELS.names() if kind is None or MODELS.meta(n).get("kind") == kind]


def model_spec(model: nn.Module) -> Dict[str, Any]:
    """JSON-able description that rebuilds `model` with `create_model`."""
    name = getattr(model, "model_name", None)
    if name is None:
        raise ValueError("model was not built by create_model; it has no registered name")
    return {"format": "ssni", "name": name, "config": model.config}


def save_model(path: str | os.PathLike, model: nn.Module, extra: Dict[str, Any] | None = None) -> Path:
    """Write `<path>/model.safetensors` and `<path>/model.json` (atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path / "model.safetensors", model.state_dict())
    atomic_write_json(path / "model.json", {**model_spec(model), **(extra or {})})
    return path


def weights_file(path: Path, weights: str) -> Path:
    """The weights file of a checkpoint directory: "ema", "model", or "auto" (EMA when present)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "auto":
        weights = "ema" if (path / "ema.safetensors").is_file() else "model"
    file = path / f"{weights}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {file.name} (weights={weights!r}; "
                                f"weights=auto takes EMA weights when present, else model)")
    return file


@CHECKPOINT_FORMATS.register("ssni")
def _load_ssni(path: Path, spec: Dict[str, Any], weights: str = "model") -> nn.Module:
    """Native format: model.json (name + config) and <weights>.safetensors."""
    model = create_model(spec["name"], **spec.get("config", {}))
    file = weights_file(path, weights)
    load_state_checked(model, load_safetensors(file), "ssni", spec.get("config", {}), file)
    model.loaded_weights = file.stem  # "ema" or "model": what weights="auto" chose
    return model


def load_model(path: str | os.PathLike, weights: str = "model") -> nn.Module:
    """Load a model from a checkpoint directory (or a run directory with checkpoints/latest).

    `weights` picks the file: "ema", "model", or "auto" (EMA weights when the checkpoint has
    them, else the model's). Other checkpoint formats plug in via CHECKPOINT_FORMATS.

    Example::

        >>> import tempfile
        >>> from ssni import create_model, load_model
        >>> from ssni.models import save_model
        >>> net = create_model("unet_tiny")
        >>> folder = save_model(tempfile.mkdtemp(), net)       # model.safetensors + model.json
        >>> again = load_model(folder)
        >>> again.model_name, again.input_shape
        ('unet_tiny', (1, 8, 8))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if (path / "checkpoints").is_dir() and not (path / "model.json").is_file():
        path = latest_checkpoint(path / "checkpoints")
    if not (path / "model.json").is_file():
        raise FileNotFoundError(f"{path} is not a model checkpoint: model.json is missing")
    spec = read_json(path / "model.json", "model description")
    loader = CHECKPOINT_FORMATS.get(spec.get("format", "ssni"))
    model = loader(path, spec, weights=weights)
    model.eval()
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """Stable SHA-256 over parameter names, shapes and values (identifies a score network)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]
