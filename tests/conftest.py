"""Shared fixtures: small data made by the tests themselves, CPU only, few threads."""
import os

import pytest
import torch

# tiny models gain nothing from more threads, and extra threads thrash on a busy machine
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["SSNI_THREADS"] = "1"  # CLI calls inside tests keep one thread too


@pytest.fixture
def tiny_images():
    """32 random-but-structured 1x8x8 images in [0,1] with labels."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(4, 1, 8, 8, generator=g)
    labels = torch.arange(32) % 4
    x = (base[labels] + 0.1 * torch.randn(32, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, labels


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need_extra(module: str, name: str):
    """The imported module of the optional extra `name`; without it the test is skipped (saying how
    to install it), or fails when CI=true (CI installs the extras: .ci/run)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"the optional extra {name!r} is missing ({e}); pip install 'ssni[{name}]'"
        if _on_ci():
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def extra():
    """extra(module, name): need_extra as a fixture."""
    return need_extra
