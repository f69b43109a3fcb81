"""MNIST-format data sets (`fashion_mnist`, `mnist`) read from IDX files the tests write themselves."""
import gzip
import struct

import numpy as np
import pytest
import torch

from ssni.data import DataConfig, build_dataset
from ssni.data.idx import IDXFormatError, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian sizes, the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_set(folder, n_train=40, n_test=20, size=28, gz=True, seed=0):
    """Four IDX files as distributions name them; labels cycle through the 10 classes."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, (n, size, size)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            path = folder / f"{stem}-{kind}-ubyte" if not gz else folder / f"{stem}-{kind}-ubyte.gz"
            data = idx_bytes(arr)
            path.write_bytes(gzip.compress(data) if gz else data)
    return folder


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_reads_images_and_labels_exactly(tmp_path, gz):
    root = write_set(tmp_path / "fm", gz=gz)
    ds = build_dataset(DataConfig(name="fashion_mnist", root=str(root), image_size=28), "test")
    raw = read_idx(root / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")))
    assert ds.images.shape == (20, 1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw).float() / 255.0)
    assert ds.labels.tolist() == [i % 10 for i in range(20)]


def test_torchvision_layout_reserve_and_mnist(tmp_path):
    write_set(tmp_path / "data" / "MNIST" / "raw", n_train=50)
    cfg = DataConfig(name="mnist", root=str(tmp_path / "data"), image_size=14, reserve=10)
    train, reserve = build_dataset(cfg, "train"), build_dataset(cfg, "reserve")
    assert len(train) == 40 and len(reserve) == 10 and train.images.shape[-1] == 14
    assert not set(map(bytes, train.images.numpy())) & set(map(bytes, reserve.images.numpy()))


@pytest.mark.parametrize("damage,message", [
    (lambda b: bytes([1, 2]) + b[2:], "bad magic number 0102"),
    (lambda b: b[:-5], "truncated or padded IDX file: header says 20x28x28"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:2] + bytes([0x0D]) + b[3:], "IDX data type 0x0d is not supported"),
], ids=["magic", "truncated-data", "truncated-header", "dtype"])
def test_damaged_files_fail_in_one_line(tmp_path, damage, message):
    root = write_set(tmp_path / "fm", gz=False)
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IDXFormatError, match=message) as e:
        build_dataset(DataConfig(name="fashion_mnist", root=str(root), image_size=28), "test")
    assert "\n" not in str(e.value)


def test_a_truncated_gzip_fails_in_one_line(tmp_path):
    root = write_set(tmp_path / "fm", gz=True)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(IDXFormatError, match="cannot read IDX file"):
        build_dataset(DataConfig(name="fashion_mnist", root=str(root), image_size=28), "test")


def test_missing_files_name_the_package_and_the_download_option(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty")), "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte[.gz] not found" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.download=true" in msg and "\n" not in msg


def test_grey_only(tmp_path):
    root = write_set(tmp_path / "fm")
    with pytest.raises(ValueError, match="grey"):
        build_dataset(DataConfig(name="fashion_mnist", root=str(root), channels=3), "test")
