"""MNIST-format data sets: `fashion_mnist` and `mnist`, read from the standard IDX files.

An IDX file is a big-endian header (two zero bytes, a type code, the number of dimensions, then one
uint32 per dimension) followed by the data; images are type 0x08 (uint8) with 3 dimensions, labels
uint8 with 1. Files may be gzipped. Where the files are looked for: `data.root` (the four files
directly in it, or torchvision's `<root>/<Name>/raw/`), else Debian's package
(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .base import DATASETS, DataConfig, TensorImageDataset, check_split, resize

# file stems per split, as every MNIST-format distribution names them
STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class IDXFormatError(ValueError):
    """A file that is not a valid IDX file (bad magic number, truncated, wrong shape)."""


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in an IDX file (gzipped or raw); one-line errors for bad files."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:  # gzip raises these for a damaged or truncated archive
        raise IDXFormatError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXFormatError(f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'} "
                             f"(expected 00000801 for labels or 00000803 for images)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise IDXFormatError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported (expected 0x08, "
                             f"unsigned bytes)")
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise IDXFormatError(f"{path}: truncated or padded IDX file: header says {'x'.join(map(str, dims))} "
                             f"= {count} bytes of data, the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable, owns its data


def _candidates(stem: str, dirs: List[Path]) -> List[Path]:
    """Every place a file with this stem may be (raw or gzipped), in search order."""
    return [d / (stem + ext) for d in dirs for ext in ("", ".gz")]


def find_idx(stem: str, dirs: List[Path]) -> Optional[Path]:
    """The first existing file for stem under dirs, or None."""
    return next((p for p in _candidates(stem, dirs) if p.is_file()), None)


def _search_dirs(cfg: DataConfig, torchvision_name: str, debian_dir: Optional[str]) -> List[Path]:
    """data.root and its torchvision layout; without a root, Debian's location and ./data."""
    if cfg.root:
        root = Path(cfg.root).expanduser()
        return [root, root / torchvision_name / "raw"]
    dirs = [Path(debian_dir)] if debian_dir else []
    return dirs + [Path("data") / torchvision_name / "raw"]


def load_idx_dataset(split: str, cfg: DataConfig, *, name: str, torchvision_name: str,
                     debian_dir: Optional[str], apt_package: Optional[str]) -> TensorImageDataset:
    """One split of an MNIST-format data set as [N,1,S,S] images in [0,1] (S = data.image_size)."""
    check_split(split)
    if cfg.channels not in (None, 1):
        raise ValueError(f"data.channels={cfg.channels}: {name} images are grey (1 channel); leave "
                         f"data.channels unset or set it to 1")
    if cfg.download:
        _download(cfg, torchvision_name)
    dirs = _search_dirs(cfg, torchvision_name, debian_dir)
    paths = [find_idx(stem, dirs) for stem in STEMS[split]]
    if None in paths:
        missing = STEMS[split][paths.index(None)]
        where = ", ".join(str(d) for d in dirs)
        hint = f"install it with `apt-get install {apt_package}`, " if apt_package else ""
        raise FileNotFoundError(f"{name}: {missing}[.gz] not found in {where}; {hint}set data.root to a "
                                f"folder holding the four IDX files, or set data.download=true")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{name}: {paths[0]} holds shape {list(images.shape)} and {paths[1]} holds "
                             f"{list(labels.shape)}; expected [N,H,W] images and N labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(labels.astype(np.int64))
    if int(y.max()) > 9:
        raise IDXFormatError(f"{name}: {paths[1]} holds label {int(y.max())}; expected classes 0..9")
    return TensorImageDataset(resize(x, cfg.image_size), y, 10)


def _download(cfg: DataConfig, torchvision_name: str) -> None:
    """Fetch the files with torchvision's downloader into data.root (or ./data): only when asked."""
    from torchvision import datasets

    root = cfg.root or "data"
    getattr(datasets, torchvision_name)(root, train=True, download=True)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(split: str, cfg: DataConfig) -> TensorImageDataset:
    """Fashion-MNIST (Zalando, MIT licence): 60,000 training and 10,000 test 28x28 grey images."""
    return load_idx_dataset(split, cfg, name="fashion_mnist", torchvision_name="FashionMNIST",
                            debian_dir="/usr/share/datasets/fashion-mnist",
                            apt_package="dataset-fashion-mnist")


@DATASETS.register("mnist")
def load_mnist(split: str, cfg: DataConfig) -> TensorImageDataset:
    """MNIST handwritten digits: 60,000 training and 10,000 test 28x28 grey images (IDX files)."""
    return load_idx_dataset(split, cfg, name="mnist", torchvision_name="MNIST",
                            debian_dir=None, apt_package=None)
