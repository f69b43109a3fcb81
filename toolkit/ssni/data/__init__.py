"""Data sets: a registry of loaders returning in-memory images in [0, 1] with labels.

Registered: `digits`, `cifar10`, `fashion_mnist`, `mnist`, `imagefolder` (classification) and `photos`, `photofolder`
(denoising); importing this package registers all of them.
"""
from . import classification, idx, photos  # noqa: F401  (register the data sets)
from .base import DATASETS, DataConfig, TensorImageDataset, build_dataset, check_split, require_dir, resize, split_indices

__all__ = ["DATASETS", "DataConfig", "TensorImageDataset", "build_dataset", "check_split",
           "require_dir", "resize", "split_indices"]
