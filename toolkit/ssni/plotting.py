"""Figures: matplotlib without a display, and saving a figure atomically as a PNG."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

from .io import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only; never needs a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: Optional[int] = None) -> Path:
    """Render `fig` to PNG, write it atomically at `path` (folders made as needed), close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **({} if dpi is None else {"dpi": dpi}))
    finally:
        pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())
