"""Shared fixtures: small data made by the tests themselves, CPU only, few threads."""
import os
import pickle
import types

import pytest
import torch

# tiny models gain nothing from more threads, and extra threads thrash on a busy machine
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["SSNI_THREADS"] = "1"  # CLI calls inside tests keep one thread too


def load_tool(name: str) -> types.ModuleType:
    """tools/<name>.py imported as a module (the tools are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


class _Numpy1Pickler(pickle._Pickler):
    """Pickles as numpy 1.x does: numpy 2.x's `numpy._core` modules are written as `numpy.core`.

    Public checkpoints (score_sde's checkpoint_8.pth) were written with numpy 1.x, whose scalars
    pickle as numpy.core.multiarray.scalar; numpy 2.x writes numpy._core.multiarray.scalar.
    tests/fixtures/score_sde_numpy1_state.pt, written by numpy 1.26, checks that this writer matches.
    """

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module == "numpy._core" or module.startswith("numpy._core."):
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + ("numpy.core" + module[len("numpy._core"):]).encode() + b"\n"
                       + qualname.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


@pytest.fixture
def numpy1_pickle():
    """A pickle module for torch.save(..., pickle_module=...) that writes numpy scalars as numpy 1.x does."""
    return types.SimpleNamespace(Pickler=_Numpy1Pickler, Unpickler=pickle.Unpickler, load=pickle.load,
                                 dump=pickle.dump, __name__="pickle")
