"""The score-model interface: eps-prediction from (x, t) with a per-sample t, plus a score view."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..diffusion import VPDiffusion


class EpsModel(nn.Module):
    """Base class: forward(x [B,C,H,W] in [-1,1], t [B] in [0,1]) -> eps [B,C,H,W].

    Subclasses set `in_channels`, `image_size` and `config` (the keyword arguments that rebuild
    them); `diffusion` is the VP process the model was trained for.
    """

    in_channels: int
    image_size: int
    config: Dict[str, Any]

    def __init__(self, diffusion: VPDiffusion | None = None):
        super().__init__()
        self.diffusion = diffusion or VPDiffusion()
        self.autocast_dtype: Optional[torch.dtype] = None
        self.channels_last = False

    def set_speed(self, precision: str = "fp32", channels_last: bool = False) -> "EpsModel":
        """Run the network in bf16 / fp16 autocast (eps returned in float32) and/or channels_last.

        Only the network call changes: the diffusion coefficients, samplers and score norm stay in
        float32 (or float64), where their maths needs the precision.
        """
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
        self.autocast_dtype = dtypes[precision]
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """forward(x, t), under the precision and memory format chosen by `set_speed`."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return super().__call__(x, t)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = super().__call__(x, t)
        return out.float()

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Score grad_x log p_t(x) = -eps(x, t) / sigma(t); x: [B,C,H,W], t: [B]."""
        return self.diffusion.eps_to_score(self(x, t), t)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) that the network was built for."""
        return (self.in_channels, self.image_size, self.image_size)

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if x [B,C,H,W] does not fit the network."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"score network was built for images of shape [B, {self.in_channels}, "
                f"{self.image_size}, {self.image_size}], got {list(x.shape)}")
