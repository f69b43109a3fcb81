"""The score-model interface: eps-prediction from (x, t) with a per-sample t, plus a score view."""
from __future__ import annotations

from typing import Any, Dict, Tuple

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
