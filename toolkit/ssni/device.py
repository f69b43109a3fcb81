"""Where tensors run: the one place that turns "auto" into a device."""
from __future__ import annotations

from typing import Union

import torch


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' (or None) -> cuda if available else cpu; other names as torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; expected auto, cpu, cuda or "
                         f"cuda:N") from None
