"""Photo data for denoisers: scikit-image's bundled photos (embedded) and flat image folders.

Registered into `ssni.data.DATASETS`:
- `photos`: photos shipped inside scikit-image (no download), split by name into fixed train and
  test sets; `channels` 1 (all photos, converted to grey) or 3 (colour photos only).
- `photofolder`: a flat folder of images, e.g. BSD400 for training and BSD68 / Set12 for testing:
  `root/train` and `root/test` when both exist, else one folder split by `test_fraction`.

Both return equal-size squares of side `image_size`, as the tensor data sets need: the train split
tiles every photo into non-overlapping squares (random patches are then cut from those tiles),
the test split takes one centre square per photo. A photo smaller than `image_size` is centre
cropped to a square and resized up.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from ..images import list_images, read_image
from .base import DATASETS, DataConfig, TensorImageDataset, check_split, require_dir, resize, split_indices


def _sk(name: str) -> Callable[[], np.ndarray]:
    """A loader of scikit-image's bundled photo `name` (read lazily, only when used)."""
    def load() -> np.ndarray:
        """The photo as a numpy array (HxW or HxWxC, uint8)."""
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


# name -> (loader, is colour). Only files that ship inside the scikit-image wheel (no download).
PHOTOS: Dict[str, Tuple[Callable[[], np.ndarray], bool]] = {
    "camera": (_sk("camera"), False), "moon": (_sk("moon"), False),
    "coins": (_sk("coins"), False), "page": (_sk("page"), False), "text": (_sk("text"), False),
    "brick": (_sk("brick"), False), "grass": (_sk("grass"), False),
    "gravel": (_sk("gravel"), False), "cell": (_sk("cell"), False),
    "astronaut": (_sk("astronaut"), True), "coffee": (_sk("coffee"), True),
    "chelsea": (_sk("chelsea"), True), "rocket": (_sk("rocket"), True),
    "hubble_deep_field": (_sk("hubble_deep_field"), True),
    "immunohistochemistry": (_sk("immunohistochemistry"), True),
    "motorcycle": (_motorcycle, True),
}
# Fixed split by name (classic test images held out); the colour split uses the colour ones only.
PHOTO_TEST = ("camera", "astronaut", "coffee", "chelsea", "coins")


def photo_names(split: str, channels: int) -> List[str]:
    """Names of the bundled photos in a split ('train'/'test') for 1 or 3 channels."""
    check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"photos: data.channels must be 1 (grey) or 3 (colour), got {channels}")
    names = [n for n in PHOTOS if (n in PHOTO_TEST) == (split == "test")]
    return [n for n in names if channels == 1 or PHOTOS[n][1]]


def _to_tensor(arr: np.ndarray, channels: int) -> Tensor:
    """uint8/bool/float HxW or HxWxC array -> float [C,H,W] in [0,1] with the wanted channels."""
    a = np.asarray(arr)
    a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if channels == 1:
        if a.ndim == 3:  # ITU-R 601 luma, as common grey conversions do
            a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a))[None].clamp(0, 1)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous().clamp(0, 1)


def squares(img: Tensor, size: int, split: str) -> Tensor:
    """[C,H,W] -> [K,C,size,size]: all non-overlapping tiles (train) or the centre one (test)."""
    c, h, w = img.shape
    if min(h, w) < size:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return resize(img[None, :, top:top + s, left:left + s], size)
    if split == "test":
        top, left = (h - size) // 2, (w - size) // 2
        return img[None, :, top:top + size, left:left + size]
    ny, nx = h // size, w // size
    oy, ox = (h - ny * size) // 2, (w - nx * size) // 2
    tiles = img[:, oy:oy + ny * size, ox:ox + nx * size]
    tiles = tiles.reshape(c, ny, size, nx, size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(ny * nx, c, size, size)


def _dataset(images: List[Tensor], split: str, size: int) -> TensorImageDataset:
    if size < 8:
        raise ValueError(f"data.image_size must be >= 8 for photo data, got {size}")
    parts = [squares(im, size, split) for im in images]
    labels = torch.cat([torch.full((p.shape[0],), i, dtype=torch.long) for i, p in enumerate(parts)])
    return TensorImageDataset(torch.cat(parts), labels, len(images))


@DATASETS.register("photos")
def load_photos(split: str, cfg: DataConfig) -> TensorImageDataset:
    """scikit-image's bundled photos as squares of cfg.image_size (label = photo index)."""
    channels = 1 if cfg.channels is None else cfg.channels
    names = photo_names(split, channels)
    return _dataset([_to_tensor(PHOTOS[n][0](), channels) for n in names], split, cfg.image_size)


@DATASETS.register("photofolder")
def load_photofolder(split: str, cfg: DataConfig) -> TensorImageDataset:
    """Flat image folder(s) (BSD400 / BSD68 / Set12 style) as squares of cfg.image_size."""
    check_split(split)
    root = require_dir(cfg.root, "photofolder (a directory of images, or one with train/ and "
                                 "test/ sub-folders)")
    channels = 1 if cfg.channels is None else cfg.channels
    if channels not in (1, 3):
        raise ValueError(f"photofolder: data.channels must be 1 or 3, got {channels}")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    files = list_images(root / split if has_splits else root)
    if not has_splits:
        tr, te = split_indices(len(files), cfg.test_fraction, cfg.split_seed)
        files = [files[i] for i in (tr if split == "train" else te)]
    return _dataset([read_image(f, channels) for f in files], split, cfg.image_size)
