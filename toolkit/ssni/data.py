"""Datasets: every image is a float tensor in [0, 1], NCHW; labels are int64.

Registered: `digits` (scikit-learn's embedded handwritten digits), `cifar10` (torchvision, with a
root path; downloads only when asked), `imagefolder` (a folder of class sub-folders).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .registry import Registry

DATASETS = Registry("dataset")


@dataclass
class DataConfig:
    """Which data set, where, and at which size."""

    name: str = "digits"
    root: Optional[str] = None
    image_size: int = 16
    channels: Optional[int] = None  # imagefolder: 1 (grayscale) or 3; others fixed
    download: bool = False
    test_fraction: float = 0.2
    split_seed: int = 0


class TensorImageDataset(Dataset):
    """In-memory images [N,C,H,W] in [0,1] with labels [N]."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int):
        if images.dim() != 4:
            raise ValueError(f"images must be [N,C,H,W], got {list(images.shape)}")
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def split_indices(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test index split of range(n)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def resize(images: Tensor, size: int) -> Tensor:
    """Resize [N,C,H,W] to size x size (antialiased bilinear), clamped to [0,1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@DATASETS.register("digits")
def load_digits(split: str, cfg: DataConfig) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 digits, scaled to [0,1] and resized to cfg.image_size."""
    from sklearn.datasets import load_digits as _sk_digits

    _check_split(split)
    d = _sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, te = split_indices(len(labels), cfg.test_fraction, cfg.split_seed)
    idx = torch.from_numpy(tr if split == "train" else te)
    return TensorImageDataset(resize(images[idx], cfg.image_size), labels[idx], 10)


def _require_dir(root: Optional[str], what: str) -> Path:
    if not root:
        raise ValueError(f"data.root must be set for {what} (a directory path)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} root directory does not exist: {path}")
    return path


@DATASETS.register("cifar10")
def load_cifar10(split: str, cfg: DataConfig) -> TensorImageDataset:
    """torchvision CIFAR-10 from cfg.root (downloads only if cfg.download is true)."""
    from torchvision.datasets import CIFAR10

    _check_split(split)
    if not cfg.download:
        root = _require_dir(cfg.root, "cifar10")
    else:
        root = Path(cfg.root or "data/cifar10")
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=cfg.download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} ({e}); put the python version there or set "
            f"data.download=true") from e
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return TensorImageDataset(resize(images, cfg.image_size), labels, 10)


@DATASETS.register("imagefolder")
def load_imagefolder(split: str, cfg: DataConfig) -> TensorImageDataset:
    """Class sub-folders under cfg.root (or cfg.root/train and cfg.root/test if present)."""
    from PIL import Image

    _check_split(split)
    root = _require_dir(cfg.root, "imagefolder")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if has_splits else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class sub-folders under {base} (expected root/<class>/<image>)")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((base / c).iterdir())
             if f.suffix.lower() in exts]
    if not files:
        raise FileNotFoundError(f"no image files under {base}/<class>/ (extensions {sorted(exts)})")
    if not has_splits:
        tr, te = split_indices(len(files), cfg.test_fraction, cfg.split_seed)
        files = [files[i] for i in (tr if split == "train" else te)]
    mode = {1: "L", 3: "RGB", None: "RGB"}.get(cfg.channels)
    if mode is None:
        raise ValueError(f"data.channels must be 1 or 3, got {cfg.channels}")
    imgs = []
    for f, _ in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        imgs.append(resize(t[None], cfg.image_size)[0])
    labels = torch.tensor([c for _, c in files], dtype=torch.long)
    return TensorImageDataset(torch.stack(imgs), labels, len(classes))


def build_dataset(cfg: DataConfig, split: str) -> TensorImageDataset:
    """Load the configured data set's split ('train' or 'test')."""
    return DATASETS.get(cfg.name)(split, cfg)
