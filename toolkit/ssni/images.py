"""Image tensors and image files: the one validation of [B,C,H,W] batches in [0, 1], and the one
reader and writer of image files used by data sets, `ssni purify` and reports.

Files are read into float [C,H,W] in [0, 1]: 8-bit images divide by 255, 16-bit images by 65535,
floating-point images (e.g. float TIFF) are taken as they are and must already lie in [0, 1].
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read or converted."""


def check_images(x: Tensor, shape: Optional[Sequence[int]] = None, name: str = "images",
                 dtype: Optional[torch.dtype] = None) -> None:
    """Raise a clear error unless x is a finite floating [B,C,H,W] tensor with pixels in [0, 1]
    (and, if given, of per-sample `shape` (C, H, W) and of floating type `dtype`)."""
    want = "[B,C,H,W]" if shape is None else f"[B, {', '.join(map(str, shape))}]"
    if not torch.is_tensor(x) or not x.is_floating_point():
        hint = " (for 0..255 pixels: x.float() / 255)" if torch.is_tensor(x) else ""
        raise ValueError(f"{name} must be a floating-point tensor {want} in [0, 1], got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')}{hint}")
    if dtype is not None and x.dtype != dtype:  # converting would change values: the caller decides
        raise ValueError(f"{name} are {x.dtype}; expected {dtype} (the model's dtype): call "
                         f"x.to({dtype}) first")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch {want} in [0, 1], got shape "
                         f"{list(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise ValueError(f"the score network was built for images of shape [B, {c}, {h}, {w}] "
                         f"(channels {c}, size {h}x{w}); got {list(x.shape)}")
    flat = x.detach().flatten(1)
    finite = torch.isfinite(flat).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"{name} hold NaN/Inf in samples {bad}; expected finite pixels in [0, 1]")
    lo, hi = flat.min(1).values, flat.max(1).values
    out = (lo < 0) | (hi > 1)
    if bool(out.any()):
        bad = torch.nonzero(out).flatten().tolist()
        ranges = [(round(lo[b].item(), 4), round(hi[b].item(), 4)) for b in bad[:8]]
        raise ValueError(f"pixels outside [0, 1] in samples {bad} (min, max per sample: {ranges}); "
                         f"expected {name} in [0, 1] (convert from [-1, 1] or [0, 255] first)")


def list_images(path: str | os.PathLike) -> List[Path]:
    """Image files: the file itself, or a folder's images (sorted by name, not recursive)."""
    if not str(path):
        raise ValueError("input must be set: an image file or a folder of images (input=...)")
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{p} is not an image file; expected one of {IMAGE_EXTENSIONS}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no image files in {p} (extensions {IMAGE_EXTENSIONS})")
        return files
    raise FileNotFoundError(f"input does not exist: {p} (expected an image file or a folder)")


def non_images(path: str | os.PathLike) -> List[Path]:
    """The files of a folder that list_images leaves out (not an image extension); [] for a file."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return []
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() not in IMAGE_EXTENSIONS)


def _to_unit_range(arr: np.ndarray, path: Path) -> np.ndarray:
    """uint8 / uint16 / int / float pixels -> float32 in [0, 1] (documented conversions)."""
    if arr.dtype == np.uint8 or arr.dtype == bool:
        return arr.astype(np.float32) / (1.0 if arr.dtype == bool else 255.0)
    if arr.dtype.kind in "iu":  # 16-bit (and wider) integer pixels
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(arr.dtype).max)
        if arr.min(initial=0) < 0:
            raise ImageReadError(f"{path}: negative integer pixels; expected unsigned 8- or "
                                 f"16-bit images")
        warnings.warn(f"{path}: {arr.dtype} image read as 16-bit (divided by {top:g})", stacklevel=3)
        return arr.astype(np.float32) / top
    if arr.dtype.kind == "f":
        a = arr.astype(np.float32)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1:
            raise ImageReadError(f"{path}: floating-point pixels in [{np.nanmin(a):.4g}, "
                                 f"{np.nanmax(a):.4g}]; float images must hold values in [0, 1]")
        return a
    raise ImageReadError(f"{path}: unsupported pixel type {arr.dtype}")


def _plain(im, path: Path, channels: int):
    """An 8-bit PIL image as "L" (channels 1) or "RGB" (3). Alpha carries no pixel values: an opaque
    one is dropped (nothing is lost), transparent pixels are an error (they need a background
    first); colour made grey is a documented conversion (ITU-R 601 luma), with a warning."""
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
        if alpha.min(initial=255) < 255:
            raise ImageReadError(
                f"{path}: {im.mode} image with transparent pixels (alpha down to {int(alpha.min())} of 255); "
                f"the network takes {channels}-channel images without alpha: flatten it onto a background "
                "first (e.g. PIL's Image.alpha_composite) or save it without transparency")
        im = im.convert("RGB" if im.mode != "LA" else "L")
    if channels == 3:
        return im.convert("RGB")
    if im.mode not in ("L", "1"):
        rgb = np.asarray(im.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            warnings.warn("colour images converted to grey (ITU-R 601 luma) for a 1-channel network or "
                          "data.channels=1", stacklevel=4)
    return im.convert("L")


def read_image(path: str | os.PathLike, channels: int) -> Tensor:
    """One image file as float [C,H,W] in [0, 1] with 1 (grey) or 3 (RGB) channels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"images can be read with 1 or 3 channels, not {channels}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: keep precision
                arr = _to_unit_range(np.asarray(im), path)
                if arr.ndim == 3:
                    arr = arr[..., :3].mean(-1) if channels == 1 else arr[..., :3]
                if channels == 3 and arr.ndim == 2:
                    arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(_plain(im, path, channels), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageReadError(f"{path} is not a readable image file ({e})") from None
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)).contiguous()


def write_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Write [C,H,W] in [0, 1] as an 8-bit PNG atomically (temp file + rename)."""
    import io

    from PIL import Image

    arr = (image.detach().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_grid_png(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save [N,C,H,W] images in [0,1] as one PNG grid (upscaled for viewing)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.cpu(), nrow=nrow, padding=1, pad_value=1.0)
    scale = max(1, 256 // grid.shape[-1] * 2) if grid.shape[-1] < 256 else 1
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return write_png(grid, path)
