"""The score-model contract around public backbones, and `load_pretrained` for public checkpoints.

Contract (what samplers, the score norm and the defense see): an `EpsModel`,
forward(x [B,C,H,W] in [-1, 1], t [B] continuous VP time in [0, 1]) -> eps [B,C,H,W], with a
`diffusion` (the VP process), `in_channels`, `image_size`. Discrete step i is t = (i + 1) / N.

`VPBackbone` owns the conventions of a backbone that was trained elsewhere: how continuous t
becomes its time input (TIME_INPUTS), and which output channels are eps (a learn_sigma model
returns eps and a variance; the first `in_channels` are eps). Loaders of public formats
(PRETRAINED_FORMATS) build the backbone with the original parameter names, load the weights
(`torch.load(weights_only=True)` or safetensors only), and wrap it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor, nn

from ..diffusion import VPDiffusion
from ..registry import Registry
from .base import TIME_INPUTS, EpsModel, time_step_index, time_t999

PRETRAINED_FORMATS = Registry("pretrained format")


class VPBackbone(EpsModel):
    """A backbone behind the score-model contract; forward(x [B,C,H,W], t [B]) -> eps [B,C,H,W].

    backbone(x, time_input [B]) returns [B, C', H, W] with C' >= in_channels; the first
    in_channels are eps (a learn_sigma backbone's extra channels are dropped).
    """

    def __init__(self, backbone: nn.Module, *, in_channels: int, image_size: int, time_input: str,
                 diffusion: Optional[VPDiffusion] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__(diffusion)
        TIME_INPUTS.get(time_input)  # unknown names fail here, listing the choices
        self.backbone = backbone
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.time_input = time_input
        self.config = dict(config or {})

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """eps prediction; x [B,C,H,W] in model space [-1, 1], t [B] in [0, 1] -> [B,C,H,W]."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = self.backbone(x, self.network_time(t))
        if out.shape[1] < self.in_channels:
            raise ValueError(f"backbone returned {out.shape[1]} channels, fewer than the "
                             f"{self.in_channels} input channels")
        return out[:, :self.in_channels]


def load_pretrained(path: str | os.PathLike, format: str, **config: Any) -> EpsModel:
    """A public score checkpoint as an EpsModel (eval mode): format in PRETRAINED_FORMATS.

    e.g. load_pretrained("checkpoint_8.pth", "score_sde") (EMA weights; weights="model" for the
    raw ones), load_pretrained("256x256_diffusion_uncond.pt", "guided_diffusion").
    """
    loader: Callable[..., EpsModel] = PRETRAINED_FORMATS.get(format)
    model = loader(path, **config)
    model.eval()
    return model


FIRST_LINE = 260  # characters for the keys and shapes of a mismatch message (the path comes before them)


def _listed(names: List[str], n: int) -> str:
    """The first n of names and how many there are, e.g. "['a', 'b'] ... (7)"."""
    return f"{names[:n]}{' ...' if len(names) > n else ''} ({len(names)})"


def mismatch_summary(own: Dict[str, Tensor], state: Dict[str, Tensor], shapes_only: bool = False) -> Optional[str]:
    """Missing / unexpected keys and shape mismatches of `state` against `own` (name -> tensor), or None.

    A short line (about FIRST_LINE characters: fewer names when they are long); shapes_only
    compares the shapes of the names both have and nothing else.
    """
    missing = [] if shapes_only else [k for k in own if k not in state]
    unexpected = [] if shapes_only else [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    line = ""
    for n in (3, 2, 1):
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing, n)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected, n)}")
        if shapes:
            parts.append(f"shape mismatches (checkpoint vs model) {_listed(shapes, n)}")
        line = "; ".join(parts)
        if len(line) <= FIRST_LINE:
            break
    return line


def describe_mismatch(model: nn.Module, state: Dict[str, Tensor], fmt: str,
                      config: Dict[str, Any]) -> Optional[str]:
    """What does not fit, or None: the keys and shapes first (one short line), then the assumed
    format and options on a second line."""
    line = mismatch_summary(model.state_dict(), state)
    if line is None:
        return None
    return f"{line}\n(the checkpoint read as format {fmt!r} with options {config})"


def load_state_checked(model: nn.Module, state: Dict[str, Tensor], fmt: str, config: Dict[str, Any],
                       path: str | os.PathLike) -> None:
    """load_state_dict(strict) with an error naming what does not fit first, and the file.

    First line: the file, then its first missing and unexpected keys and shape mismatches; the
    assumed format and options follow on the next line.
    """
    problem = describe_mismatch(model, state, fmt, config)
    if problem:
        raise ValueError(f"{path} does not fit the {fmt} model: {problem}")
    model.load_state_dict(state)


def load_weights_file(model: nn.Module, path: str | os.PathLike, fmt: str, config: Dict[str, Any]) -> None:
    """Fill `model` strictly from a weights file: .safetensors, or a torch file of tensors (weights_only;
    a {"state_dict": ...} wrapper is opened); what does not fit is a one-line ValueError naming the file."""
    from ..io import load_safetensors

    state = load_safetensors(path) if str(path).endswith(".safetensors") else torch_file(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    load_state_checked(model, state, fmt, config, path)


def torch_file(path: str | os.PathLike) -> Any:
    """A torch checkpoint file, loaded with weights_only=True (pickled code is refused)."""
    from ..io import safe_torch_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return safe_torch_load(path, map_location="cpu")


__all__ = ["TIME_INPUTS", "PRETRAINED_FORMATS", "VPBackbone", "load_pretrained", "describe_mismatch",
           "load_state_checked", "load_weights_file", "mismatch_summary", "torch_file", "time_t999", "time_step_index"]
