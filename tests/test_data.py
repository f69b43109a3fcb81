import numpy as np
import pytest
import torch
from PIL import Image

from ssni.data import DATASETS, DataConfig, build_dataset


def test_digits_split_is_deterministic_and_disjoint():
    cfg = DataConfig(name="digits", image_size=16)
    tr, te = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert tr.images.shape[1:] == (1, 16, 16) and len(tr) + len(te) == 1797
    assert tr.images.min() >= 0 and tr.images.max() <= 1
    tr2 = build_dataset(cfg, "train")
    assert torch.equal(tr.images, tr2.images)
    assert set(tr.labels.tolist()) == set(range(10))


def test_imagefolder_reads_class_folders(tmp_path):
    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for k in range(5):
            Image.fromarray(rng.randint(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / c / f"{k}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, channels=3, test_fraction=0.3)
    tr, te = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(tr) + len(te) == 10 and tr.images.shape[1:] == (3, 8, 8) and tr.num_classes == 2
    assert 0 <= tr.images.min() and tr.images.max() <= 1


def test_cifar10_loader_reads_local_files(tmp_path, monkeypatch):
    """A fake CIFAR-10 python folder in torchvision's layout (no download)."""
    import hashlib
    import pickle

    from torchvision.datasets import CIFAR10

    base = tmp_path / CIFAR10.base_folder
    base.mkdir(parents=True)
    rng = np.random.RandomState(0)
    entries = CIFAR10.train_list + CIFAR10.test_list
    for fname, _ in entries:
        data = {"data": rng.randint(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(base / fname, "wb") as fh:
            pickle.dump(data, fh)
    with open(base / CIFAR10.meta["filename"], "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    md5 = {f: hashlib.md5((base / f).read_bytes()).hexdigest() for f, _ in entries}
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, md5[f]] for f, _ in CIFAR10.test_list])
    meta_md5 = hashlib.md5((base / CIFAR10.meta["filename"]).read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), image_size=32), "test")
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [0, 1, 2, 3]


def test_registry_lists_datasets():
    assert {"digits", "cifar10", "imagefolder"} <= set(DATASETS.names())


def test_reserve_is_held_out_of_train_and_is_its_own_split():
    base = build_dataset(DataConfig(name="digits", image_size=8), "train")
    cfg = DataConfig(name="digits", image_size=8, reserve=100)
    tr, rs = build_dataset(cfg, "train"), build_dataset(cfg, "reserve")
    assert len(tr) == len(base) - 100 and len(rs) == 100
    # together they are the training split, with no image in both
    rows = lambda ds: {tuple(r) for r in ds.images.flatten(1).tolist()}  # noqa: E731
    assert rows(tr) | rows(rs) == rows(base) and not rows(tr) & rows(rs)
    assert torch.equal(build_dataset(cfg, "reserve").images, rs.images)  # deterministic
    assert torch.equal(build_dataset(cfg, "test").images, build_dataset(DataConfig(name="digits", image_size=8),
                                                                        "test").images)
    with pytest.raises(ValueError, match="split 'reserve' needs data.reserve >= 1"):
        build_dataset(DataConfig(name="digits", image_size=8), "reserve")
    with pytest.raises(ValueError, match=r"data.reserve must be in \[0, 1437\]"):
        build_dataset(DataConfig(name="digits", image_size=8, reserve=1438), "train")
    with pytest.raises(ValueError, match="split must be one of train, test, reserve, got 'val'"):
        build_dataset(cfg, "val")
