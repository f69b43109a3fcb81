"""Data sets in memory: every image is a float tensor in [0, 1], NCHW; labels are int64."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..config import setting
from ..registry import Registry

DATASETS = Registry("dataset")


@dataclass
class DataConfig:
    """Which data set, where, and at which size."""

    name: str = "digits"
    root: Optional[str] = None
    image_size: int = setting(16, ge=1)
    channels: Optional[int] = setting(None, ge=1, le=4)  # imagefolder: 1 (grayscale) or 3; others fixed
    download: bool = False
    test_fraction: float = setting(0.2, gt=0, lt=1)
    split_seed: int = 0
    # training images held back from training networks: split "train" leaves them out, split
    # "reserve" is them (e.g. to fit a reweight on images the classifier never saw)
    reserve: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:  # when the recipe loads, not when the data set is read
            DATASETS.get(self.name)


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


SPLITS = ("train", "test", "reserve")


def check_split(split: str) -> None:
    """Raise unless split is 'train' or 'test' (what a data set's loader reads)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def reserved_indices(n: int, reserve: int, seed: int) -> np.ndarray:
    """The `reserve` of range(n) training images held back from training networks (sorted)."""
    if not 0 <= reserve < n:
        raise ValueError(f"data.reserve must be in [0, {n - 1}] (the training split has {n} images), got {reserve}")
    # a seed of its own, so the reserve does not follow the train/test permutation
    return np.sort(np.random.RandomState(seed + 7919).permutation(n)[:reserve])


def require_dir(root: Optional[str], what: str) -> Path:
    """data.root as an existing directory, or a clear error."""
    if not root:
        raise ValueError(f"data.root must be set for {what} (a directory path)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} root directory does not exist: {path}")
    return path


def _honours_channels(ds: TensorImageDataset, cfg: DataConfig) -> TensorImageDataset:
    """ds, unless data.channels asks for channels its images do not have (a loader that cannot honour it)."""
    have = ds.image_shape[0]
    if cfg.channels is not None and cfg.channels != have:
        raise ValueError(f"data.channels={cfg.channels}, but the {cfg.name!r} data set has {have}-channel images "
                         f"and cannot convert them; set data.channels={have} or leave it out")
    return ds


def build_dataset(cfg: DataConfig, split: str) -> TensorImageDataset:
    """Load the configured data set's split: 'test', 'train' (less the `reserve` images) or 'reserve'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "reserve" and cfg.reserve < 1:
        raise ValueError("split 'reserve' needs data.reserve >= 1 (training images held back from "
                         f"training networks), got data.reserve={cfg.reserve}")
    if split == "test" or (cfg.reserve == 0 and split == "train"):
        return _honours_channels(DATASETS.get(cfg.name)(split, cfg), cfg)
    full = _honours_channels(DATASETS.get(cfg.name)("train", cfg), cfg)
    held = reserved_indices(len(full), cfg.reserve, cfg.split_seed)
    keep = held if split == "reserve" else np.setdiff1d(np.arange(len(full)), held)
    idx = torch.from_numpy(keep)
    return TensorImageDataset(full.images[idx], full.labels[idx], full.num_classes)
