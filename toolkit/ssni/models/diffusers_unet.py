"""diffusers' `UNet2DModel` folders as EpsModels: the "diffusers" format, through the optional extra.

    pip install 'ssni[diffusers]'
    load_pretrained("ddpm-cifar10-32", "diffusers")        # a pipeline folder (unet/, scheduler/ inside)
    load_pretrained("ddpm-cifar10-32/unet", "diffusers")   # its unet folder (the schedule from ../scheduler/)
    load_pretrained("unet", "diffusers", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)

A folder is what `save_pretrained` writes: config.json and diffusion_pytorch_model.safetensors (or
.bin, or their sharded form). Nothing is downloaded: a hub id such as google/ddpm-cifar10-32 must be
downloaded by the user first and passed as the local folder.

The network is diffusers' own UNet2DModel built from config.json (`from_config`); the weights are
read here (safetensors, or torch.load with weights_only=True, whichever the diffusers version), and
loaded strictly. Checkpoints from before diffusers renamed its attention parameters (query, key,
value, proj_attn; e.g. the original DDPM uploads) are renamed to to_q, to_k, to_v, to_out.0 as
diffusers itself does.

Schedule: the scheduler config of the pipeline (scheduler/scheduler_config.json next to unet/),
else DDPMScheduler's defaults (1000 steps, betas 1e-4..0.02, linear), each overridable by keyword.
Only a linear beta schedule and eps prediction are supported: betas linspace(beta_start, beta_end, N)
are VPDiffusion(beta_start N, beta_end N, N). Time input: the step index t N - 1. A learned-variance
model (out_channels = 2 in_channels) returns eps in its first in_channels.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..diffusion import VPDiffusion
from ..io import load_safetensors, safe_torch_load
from .factory import WEIGHTS
from .pretrained import PRETRAINED_FORMATS, VPBackbone, load_state_checked

DIFFUSERS_EXTRA = "the diffusers format needs the optional extra: pip install 'ssni[diffusers]'"
WEIGHT_NAME = "diffusion_pytorch_model"
# DDPMScheduler's defaults, which are the DDPM (Ho et al.) schedule of google/ddpm-cifar10-32
DDPM_SCHEDULE: Dict[str, Any] = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                     beta_schedule="linear")
# subfolders of a pipeline / training checkpoint folder by `weights`
UNET_SUBFOLDERS = {"model": "unet", "ema": "unet_ema"}
# attention parameter names before diffusers 0.14 -> after
DEPRECATED_ATTENTION = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                        (".proj_attn.", ".to_out.0."))
# what EMAModel.save_pretrained adds to a unet config; not UNet2DModel arguments
EMA_CONFIG_KEYS = ("decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step",
                   "use_ema_warmup")


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as a backbone; forward(x [B,C,H,W], steps [B]) -> [B,out_channels,H,W]."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, steps: Tensor) -> Tensor:
        """x [B,C,H,W] in [-1, 1], steps [B] (DDPM step indices, may be fractional) -> [B,out_channels,H,W]."""
        return self.unet(x, steps).sample


def import_unet2d() -> Any:
    """diffusers' UNet2DModel class, or an ImportError naming the optional extra."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ImportError(f"{DIFFUSERS_EXTRA} (importing diffusers failed: {e})") from e
    return UNet2DModel


def _read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from a file, or a one-line ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def find_unet_folder(path: str | os.PathLike, weights: str = "auto") -> Tuple[Path, str]:
    """(the unet folder to load, what it holds: "unet" / "unet_ema" / "folder") of a unet or pipeline folder."""
    if weights not in WEIGHTS:
        raise ValueError(f"diffusers: weights={weights!r}; choose one of {list(WEIGHTS)}")
    root = Path(path)
    if not root.is_dir():
        if root.exists():
            raise ValueError(f"{path}: the diffusers format takes a folder written by save_pretrained "
                             f"(config.json and {WEIGHT_NAME}.safetensors or .bin), not a file")
        raise FileNotFoundError(
            f"diffusers folder not found: {path}; nothing is downloaded at run time: download a hub model "
            f"first (e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32`) "
            f"and pass the local folder")
    if (root / "config.json").is_file():
        if weights == "ema":
            raise ValueError(f"{path}: a unet folder holds one set of weights; for weights='ema' pass the "
                             f"folder that holds unet_ema/, or this folder with weights='auto'")
        return root, "folder"
    present = [sub for sub in ("unet_ema", "unet") if (root / sub / "config.json").is_file()]
    if not present:
        raise FileNotFoundError(f"{path}: neither a UNet2DModel folder (config.json) nor a pipeline or "
                                f"training checkpoint folder (unet/config.json, unet_ema/config.json)")
    sub = present[0] if weights == "auto" else UNET_SUBFOLDERS[weights]
    if sub not in present:
        raise FileNotFoundError(f"{path}: weights={weights!r} needs {sub}/config.json; the folder has "
                                f"{', '.join(p + '/' for p in present)}")
    return root / sub, sub


def diffusers_schedule(scheduler_config: Optional[Path] = None, **overrides: Any) -> Dict[str, Any]:
    """The training schedule: DDPMScheduler's defaults < the scheduler config file < keyword overrides."""
    unknown = sorted(set(overrides) - set(DDPM_SCHEDULE))
    if unknown:
        raise ValueError(f"unknown diffusers option(s) {unknown}; valid options: weights, "
                         f"{', '.join(DDPM_SCHEDULE)}")
    cfg: Dict[str, Any] = {**DDPM_SCHEDULE, "trained_betas": None, "prediction_type": "epsilon"}
    source = "DDPMScheduler's defaults"
    if scheduler_config is not None:
        data = _read_json(scheduler_config)
        cfg.update({k: data[k] for k in cfg if k in data})
        source = str(scheduler_config)
    cfg.update(overrides)
    if overrides:
        source += f" with {overrides}"
    if cfg["beta_schedule"] != "linear":
        raise ValueError(f"diffusers: beta_schedule {cfg['beta_schedule']!r} ({source}) is not supported; "
                         f"only 'linear' (the VP schedule) can be loaded")
    if cfg["trained_betas"] is not None:
        raise ValueError(f"diffusers: trained_betas ({source}) are not supported; only a linear schedule "
                         f"can be loaded")
    if cfg["prediction_type"] not in (None, "epsilon"):
        raise ValueError(f"diffusers: prediction_type {cfg['prediction_type']!r} ({source}) is not supported; "
                         f"only eps-predicting ('epsilon') models can be loaded")
    try:
        steps, start, end = int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    except (TypeError, ValueError):
        raise ValueError(f"diffusers: num_train_timesteps, beta_start, beta_end must be numbers ({source}), "
                         f"got {cfg['num_train_timesteps']!r}, {cfg['beta_start']!r}, {cfg['beta_end']!r}") from None
    if steps <= 0 or not 0 < start < end:
        raise ValueError(f"diffusers: need num_train_timesteps > 0 and 0 < beta_start < beta_end ({source}), "
                         f"got {steps}, {start}, {end}")
    cfg.update(num_train_timesteps=steps, beta_start=start, beta_end=end)
    del cfg["trained_betas"]
    return cfg


def check_unet_config(config: Dict[str, Any], path: Path) -> Tuple[int, int, int]:
    """(in_channels, out_channels, image_size) of a UNet2DModel config we can run, or a one-line error."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{path}: a {name}; the diffusers format loads UNet2DModel (unconditional) only")
    embedding = config.get("time_embedding_type", "positional")
    if embedding != "positional":
        raise ValueError(f"{path}: time_embedding_type {embedding!r} is not supported; only 'positional' "
                         f"(the sinusoidal embedding of the DDPM step index) can be loaded")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError(f"{path}: a class-conditional UNet2DModel needs class labels, which the score-model "
                         f"contract (x, t) does not carry")
    cin, cout = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    if cout not in (cin, 2 * cin):
        raise ValueError(f"{path}: out_channels {cout} is neither in_channels {cin} (eps) nor twice it "
                         f"(eps and a learned variance)")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{path}: sample_size {size!r}; square images (an int or [n, n]) are supported")
    return cin, cout, size


def read_unet_weights(folder: Path) -> Tuple[Dict[str, Tensor], Path]:
    """(state dict, the file or index it came from): safetensors preferred, a .bin with weights_only=True."""
    for suffix in ("safetensors", "bin"):
        file = folder / f"{WEIGHT_NAME}.{suffix}"
        if file.is_file():
            return _weights_file(file), file
    for suffix in ("safetensors", "bin"):  # sharded: an index {"weight_map": {name: shard file}}
        index = folder / f"{WEIGHT_NAME}.{suffix}.index.json"
        if index.is_file():
            state: Dict[str, Tensor] = {}
            for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
                state.update(_weights_file(folder / shard))
            return state, index
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder}: no {WEIGHT_NAME}.safetensors or .bin (the folder holds {found})")


def _weights_file(file: Path) -> Dict[str, Tensor]:
    """One weights file as {name: tensor}: safetensors, or a torch file loaded with weights_only=True."""
    if file.name.endswith(".safetensors"):
        return load_safetensors(file)
    return _tensor_dict(safe_torch_load(file), file)


def _tensor_dict(obj: Any, path: Path) -> Dict[str, Tensor]:
    """A loaded .bin as {name: tensor}, or a one-line error saying what it holds instead."""
    if isinstance(obj, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    what = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), as save_pretrained writes; "
                     f"the file holds {what}")


def rename_deprecated_attention(state: Dict[str, Tensor], own_keys: Any) -> Dict[str, Tensor]:
    """Old attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0 where the model has them."""
    own = set(own_keys)
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            for old, new in DEPRECATED_ATTENTION:
                renamed = key.replace(old, new)
                if renamed != key and renamed in own:
                    key = renamed
                    break
        out[key] = value
    return out


@PRETRAINED_FORMATS.register("diffusers")
def load_diffusers(path: str | os.PathLike, weights: str = "auto", **schedule: Any) -> VPBackbone:
    """A diffusers UNet2DModel folder (a unet or pipeline folder) as an EpsModel [B,C,H,W]; needs the extra.

    weights: "auto" (unet_ema/ when the folder has it, else unet/), "model" (unet/) or "ema"
    (unet_ema/, as in diffusers training checkpoints); a unet folder is loaded as it is.
    schedule: num_train_timesteps, beta_start, beta_end, beta_schedule (override the scheduler config).
    """
    unet_class = import_unet2d()
    unet_folder, which = find_unet_folder(path, weights)
    around = unet_folder.absolute().parent  # the pipeline folder, when unet_folder is its unet/
    scheduler_file = around / "scheduler" / "scheduler_config.json"
    sched = diffusers_schedule(scheduler_file if scheduler_file.is_file() else None, **schedule)
    config_file = unet_folder / "config.json"
    config = {k: v for k, v in _read_json(config_file).items() if k not in EMA_CONFIG_KEYS}
    in_channels, out_channels, image_size = check_unet_config(config, config_file)
    state, source = read_unet_weights(unet_folder)
    # from_config + our own strict load, not from_pretrained: the same weights-only reading and one-line
    # mismatch errors whatever the diffusers version, and no code path that could reach the hub
    unet = unet_class.from_config(config)
    state = rename_deprecated_attention(state, unet.state_dict().keys())
    summary = {k: config[k] for k in ("in_channels", "out_channels", "block_out_channels", "down_block_types")
               if k in config}
    load_state_checked(unet, state, "diffusers", summary, source)
    n = sched["num_train_timesteps"]
    # linspace(beta_start, beta_end, N) are the discrete betas of VPDiffusion(beta_start N, beta_end N, N)
    diffusion = VPDiffusion(sched["beta_start"] * n, sched["beta_end"] * n, n)
    cfg = {**sched, "weights": weights, "unet_folder": str(unet_folder), "loaded": which,
           "scheduler_config": str(scheduler_file) if scheduler_file.is_file() else None,
           "in_channels": in_channels, "out_channels": out_channels, "image_size": image_size}
    return VPBackbone(DiffusersUNet(unet), in_channels=in_channels, image_size=image_size,
                      time_input="step_index", diffusion=diffusion, config=cfg)


__all__ = ["DiffusersUNet", "DIFFUSERS_EXTRA", "DDPM_SCHEDULE", "import_unet2d", "find_unet_folder",
           "diffusers_schedule", "check_unet_config", "read_unet_weights", "rename_deprecated_attention", "load_diffusers"]
