"""Classification data sets: `digits` (scikit-learn's embedded handwritten digits), `cifar10`
(torchvision, with a root path; downloads only when asked), `imagefolder` (class sub-folders)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import IMAGE_EXTENSIONS, read_image
from .base import DATASETS, DataConfig, TensorImageDataset, check_split, require_dir, resize, split_indices


@DATASETS.register("digits")
def load_digits(split: str, cfg: DataConfig) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 digits, scaled to [0,1] and resized to cfg.image_size."""
    from sklearn.datasets import load_digits as _sk_digits

    check_split(split)
    d = _sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, te = split_indices(len(labels), cfg.test_fraction, cfg.split_seed)
    idx = torch.from_numpy(tr if split == "train" else te)
    return TensorImageDataset(resize(images[idx], cfg.image_size), labels[idx], 10)


@DATASETS.register("cifar10")
def load_cifar10(split: str, cfg: DataConfig) -> TensorImageDataset:
    """torchvision CIFAR-10 from cfg.root (downloads only if cfg.download is true)."""
    from torchvision.datasets import CIFAR10

    check_split(split)
    if not cfg.download:
        root = require_dir(cfg.root, "cifar10")
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
    check_split(split)
    root = require_dir(cfg.root, "imagefolder")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if has_splits else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class sub-folders under {base} (expected root/<class>/<image>)")
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((base / c).iterdir())
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"no image files under {base}/<class>/ (extensions "
                                f"{sorted(IMAGE_EXTENSIONS)})")
    if not has_splits:
        tr, te = split_indices(len(files), cfg.test_fraction, cfg.split_seed)
        files = [files[i] for i in (tr if split == "train" else te)]
    if cfg.channels not in (1, 3, None):
        raise ValueError(f"data.channels must be 1 or 3, got {cfg.channels}")
    imgs = [resize(read_image(f, cfg.channels or 3)[None], cfg.image_size)[0] for f, _ in files]
    labels = torch.tensor([c for _, c in files], dtype=torch.long)
    return TensorImageDataset(torch.stack(imgs), labels, len(classes))
