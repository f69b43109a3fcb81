"""The package's layers only point down, and every registry is complete after `import ssni`."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layers():
    spec = importlib.util.spec_from_file_location("layers", REPO / "tools" / "layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_upward_imports_and_no_cycles():
    layers = _layers()
    g = layers.graph()
    assert len(g) > 50
    assert layers.upward_imports(g) == []
    assert layers.cycles(g) == [] and layers.package_cycles(g) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    layers = _layers()
    pkg = tmp_path / "ssni"
    (pkg / "models").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text("from ..models import factory\n")
    # hidden inside a function, as cycles used to be
    (pkg / "models" / "factory.py").write_text("def f():\n    from ..training import loop\n")
    g = layers.graph(pkg)
    assert g["ssni.models.factory"] == {"ssni.training.loop"}
    assert any("ssni.models.factory (models) -> ssni.training.loop" in v for v in layers.upward_imports(g))
    assert layers.cycles(g) == [["ssni.models.factory", "ssni.training.loop"]]


def test_every_registry_is_complete_after_a_bare_import():
    code = """
import json, ssni
from ssni.data import DATASETS
from ssni.noise import NOISE_SAMPLERS
from ssni.purify import SAMPLERS, GRAD_MODES
from ssni.scoring import REWEIGHTS
from ssni.attacks import ATTACKS, DENOISER_ATTACKS, LOSSES
from ssni.defense import VIEWS, VOTES
from ssni.models import MODELS, CHECKPOINT_FORMATS
print(json.dumps({n: r.names() for n, r in [("data", DATASETS), ("noise", NOISE_SAMPLERS),
    ("samplers", SAMPLERS), ("grads", GRAD_MODES), ("reweights", REWEIGHTS), ("attacks", ATTACKS),
    ("denoiser_attacks", DENOISER_ATTACKS), ("losses", LOSSES), ("views", VIEWS), ("votes", VOTES),
    ("models", MODELS), ("formats", CHECKPOINT_FORMATS)]}))
"""
    # the `from ssni.x import` lines only read names: `import ssni` alone must have filled them
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = json.loads(out.stdout)
    assert set(names["data"]) >= {"digits", "cifar10", "imagefolder", "photos", "photofolder"}
    assert set(names["noise"]) >= {"gaussian", "typical_set"}
    assert set(names["samplers"]) >= {"diffpure", "ddpm", "ddim", "gdmp", "gns"}
    assert set(names["reweights"]) >= {"constant", "linear", "sigmoid", "learned"}
    assert set(names["attacks"]) >= {"pgd", "apgd", "transfer"}
    assert set(names["views"]) == {"full", "adaptive", "bpda", "bare"}
    assert set(names["formats"]) >= {"ssni", "timm"}
    assert "dncnn" in names["models"] and "unet_digits" in names["models"]


def test_registries_are_filled_by_import_ssni_alone():
    """Which modules a bare `import ssni` loads: every one that registers names."""
    code = "import sys, ssni; print(' '.join(sorted(m for m in sys.modules if m.startswith('ssni'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    for needed in ("ssni.data.photos", "ssni.typical", "ssni.purify.samplers", "ssni.scoring.reweight",
                   "ssni.attacks.pgd", "ssni.defense", "ssni.models.dncnn", "ssni.models.classifier"):
        assert needed in loaded, needed
