"""Building blocks shared by the U-Nets: resampling between resolutions."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def resample(x: Tensor, mode: Optional[str]) -> Tensor:
    """Nearest x2 upsampling ("up"), 2x2 average pooling ("down") or nothing; [B,C,H,W]."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x
