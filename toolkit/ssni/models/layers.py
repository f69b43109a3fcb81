"""Building blocks shared by the U-Nets: resampling between resolutions, level geometry checks."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor


def resample(x: Tensor, mode: Optional[str]) -> Tensor:
    """Nearest x2 upsampling ("up"), 2x2 average pooling ("down") or nothing; [B,C,H,W]."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


def level_sizes(image_size: int, levels: int, attention: Sequence[int], what: str, size_name: str,
                attn_name: str) -> List[int]:
    """The feature-map size of each U-Net level; raises if image_size does not halve down the levels
    or an attention resolution is not one of them (`what`, the names: for the error message)."""
    if image_size <= 0 or image_size % 2 ** (levels - 1):
        raise ValueError(f"{what} {size_name}={image_size} must be divisible by 2^{levels - 1} "
                         f"({levels} levels)")
    sizes = [image_size // 2 ** i for i in range(levels)]
    bad = [r for r in attention if r not in sizes]
    if bad:
        raise ValueError(f"{what} {attn_name}: {bad} are not resolutions of the U-Net levels {sizes} "
                         f"(they are image resolutions, e.g. 32,16,8)")
    return sizes
