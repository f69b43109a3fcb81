"""RobustBench classifiers through `classifier: {source: robustbench}`, against robustbench's own load_model.

These need the extra (pip install -e '.[robustbench]'); without it they are skipped, except under CI
(CI=true), where a missing extra fails them: .ci/run installs it (SSNI_EXTRAS=robustbench).
Weights are random, in RobustBench's model_dir layout (<model_dir>/<dataset>/<threat_model>/<name>.pt);
robustbench finds the files there and downloads nothing.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ssni.defense import ClassifierRef, load_classifier
from ssni.models.robustbench_zoo import import_robustbench, robustbench_classifier


def _installed() -> bool:
    """Whether the robustbench package (its metadata, not only a `robustbench` folder: torchattacks
    installs an old copy under that name) is installed."""
    from importlib import metadata

    try:
        metadata.distribution("robustbench")
    except metadata.PackageNotFoundError:
        return False
    return True


def _robustbench():
    """robustbench's model zoo (models, enums) and utils; skip without the extra, fail under CI."""
    if not _installed():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("robustbench is not installed: CI must install the extra (SSNI_EXTRAS=robustbench)")
        pytest.skip("robustbench is not installed (pip install -e '.[robustbench]')")
    models, enums = import_robustbench()
    from robustbench import utils

    return models, enums, utils


def _table(models, enums, dataset="cifar10", threat_model="Linf"):
    return models.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]


def _ref(name, model_dir, dataset="cifar10", threat_model="Linf"):
    return ClassifierRef(source="robustbench", name=name,
                         kwargs={"model_dir": str(model_dir), "dataset": dataset, "threat_model": threat_model})


def _same(ours, theirs, x):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not ours.training and not theirs.training
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_standard_wideresnet_matches_robustbench_load_model(tmp_path):
    """The Standard WideResNet-28-10 (36.5M parameters) as RobustBench keeps it, read by ssni and by
    robustbench.utils.load_model: the same weights and the same logits."""
    models, enums, utils = _robustbench()
    torch.manual_seed(0)
    src = _table(models, enums)["Standard"]["model"]()  # random initial weights
    assert sum(p.numel() for p in src.parameters()) == 36_479_194
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, folder / "Standard.pt")
    ours = load_classifier(_ref("Standard", tmp_path), 3, 32)
    theirs = utils.load_model("Standard", model_dir=str(tmp_path), dataset="cifar10", threat_model="Linf")
    _same(ours, theirs, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert ours.model_name == "Standard"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class _TinyEnsemble(nn.Module):
    def __init__(self):
        super().__init__()
        self.models = nn.ModuleList([_Tiny(), _Tiny()])

    def forward(self, x):
        return sum(m(x) for m in self.models) / 2


def _tiny_entry(monkeypatch, models, enums, name, cls, gdrive_id):
    monkeypatch.setitem(_table(models, enums), name, {"model": cls, "gdrive_id": gdrive_id})
    torch.manual_seed(3)
    src = cls()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    return src


@pytest.mark.parametrize("layout", ["plain", "module.", "state_dict+module.", "state_dict+model.", "module.model."])
def test_prefixes_are_removed_as_robustbench_removes_them(tmp_path, monkeypatch, layout):
    models, enums, utils = _robustbench()
    src = _tiny_entry(monkeypatch, models, enums, "TinyTest", _Tiny, "x")
    state = src.state_dict()
    prefix = layout.split("+")[-1] if layout != "plain" else ""
    state = {prefix + k: v for k, v in state.items()}
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": state} if layout.startswith("state_dict") else state, folder / "TinyTest.pt")
    ours = robustbench_classifier("TinyTest", str(tmp_path))
    theirs = utils.load_model("TinyTest", model_dir=str(tmp_path))
    _same(ours, theirs, torch.rand(2, 3, 8, 8))


def test_a_file_with_numpy_scalars_loads(tmp_path, monkeypatch):
    """Training scripts save epoch / accuracy as numpy scalars beside the weights: read as data."""
    models, enums, _ = _robustbench()
    src = _tiny_entry(monkeypatch, models, enums, "TinyTest", _Tiny, "x")
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": np.int64(99),
                "best_acc": np.float64(0.91), "lr": 0.1 * np.minimum(1.0, 0.5)}, folder / "TinyTest.pt")
    ours = robustbench_classifier("TinyTest", str(tmp_path))
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in src.state_dict().items())


def test_an_ensemble_loads_its_parts_as_robustbench_does(tmp_path, monkeypatch):
    models, enums, utils = _robustbench()
    src = _tiny_entry(monkeypatch, models, enums, "TinyEnsemble", _TinyEnsemble, ["a", "b"])
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for i, part in enumerate(src.models):
        torch.save({"state_dict": {"module." + k: v for k, v in part.state_dict().items()}},
                   folder / f"TinyEnsemble.pt_m{i}.pt")
    ours = robustbench_classifier("TinyEnsemble", str(tmp_path))
    theirs = utils.load_model("TinyEnsemble", model_dir=str(tmp_path))
    _same(ours, theirs, torch.rand(2, 3, 8, 8))
    (folder / "TinyEnsemble.pt_m1.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"TinyEnsemble.pt_m1.pt"):
        robustbench_classifier("TinyEnsemble", str(tmp_path))


@pytest.mark.parametrize("name, dataset, match", [
    ("Debenedetti2022Light_XCiT-S12", "cifar10", r"hosted on the timm hub as 'debenedetti2022light_xcit_s12_cifar10_linf'"),
    ("Bai2024MixedNUTS", "cifar10", r"ensemble that robustbench loads with code of its own"),
    ("Bai2023Improving_edm", "cifar10", r"ensemble that robustbench loads with code of its own"),
    ("Standard_R50", "imagenet", r"torchvision's pretrained network, downloaded while robustbench builds it"),
])
def test_unsupported_entries_fail_in_one_line_before_any_download(tmp_path, name, dataset, match):
    _robustbench()
    with pytest.raises(ValueError, match=match) as info:
        robustbench_classifier(name, str(tmp_path), dataset=dataset)
    assert "\n" not in str(info.value) and "not supported" in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing made


def test_a_file_that_does_not_fit_names_the_keys_first(tmp_path, monkeypatch):
    models, enums, _ = _robustbench()
    src = _tiny_entry(monkeypatch, models, enums, "TinyTest", _Tiny, "x")
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    state = src.state_dict()
    state["fc.weight"] = torch.zeros(3, 4)
    torch.save(state, folder / "TinyTest.pt")
    with pytest.raises(ValueError) as info:
        robustbench_classifier("TinyTest", str(tmp_path))
    first = str(info.value).splitlines()[0]
    assert "does not fit the robustbench model" in first and "fc.weight (3, 4) vs (10, 4)" in first


def test_the_import_fixes_do_not_outlive_the_import():
    """In a fresh interpreter: robustbench imports, its `autoattack` is pyautoattack for that import only,
    and a missing pkg_resources is stood in for (the function robustbench uses points into its package)."""
    _robustbench()
    code = (
        "import sys\n"
        "sys.modules['pkg_resources'] = None\n"  # as on setuptools >= 81
        "before = sys.modules.get('autoattack')\n"
        "from ssni.models.robustbench_zoo import import_robustbench\n"
        "import_robustbench()\n"
        "import robustbench.eval, robustbench.loaders\n"
        "assert robustbench.eval.AutoAttack.__module__.startswith('pyautoattack'), robustbench.eval.AutoAttack\n"
        "assert sys.modules.get('autoattack') is before and sys.modules['pkg_resources'] is None\n"
        "import os\n"
        "f = robustbench.loaders.pkg_resources.resource_filename('robustbench.loaders', 'helper_files')\n"
        "assert os.path.isdir(f), f\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _fake_install(root, init, record_hash=None):
    """A `robustbench` package with its metadata under root; RECORD lists __init__.py with record_hash."""
    (root / "robustbench" / "model_zoo").mkdir(parents=True)
    (root / "robustbench" / "__init__.py").write_text(init)
    (root / "robustbench" / "model_zoo" / "__init__.py").write_text("")
    info = root / "robustbench-1.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robustbench\nVersion: 1.1.1\n")
    (info / "RECORD").write_text(f"robustbench/__init__.py,{record_hash or ''},\n")


def _use(monkeypatch, root):
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(root))


def test_a_broken_install_shows_its_own_error(tmp_path, monkeypatch):
    """robustbench installed but failing to import: its error, not 'install the extra'."""
    _fake_install(tmp_path, "import a_module_robustbench_needs_xyz\n")
    _use(monkeypatch, tmp_path)
    with pytest.raises(ImportError) as info:
        robustbench_classifier("Standard", str(tmp_path))
    message = str(info.value)
    assert "robustbench is installed but does not import" in message
    assert "No module named 'a_module_robustbench_needs_xyz'" in message


def test_files_overwritten_by_another_package_are_named(tmp_path, monkeypatch):
    """torchattacks installs an old robustbench into the same folder: files that differ from
    robustbench's RECORD are reported, with the reinstall that fixes them."""
    _fake_install(tmp_path, "x = 1\n", record_hash="sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    _use(monkeypatch, tmp_path)
    with pytest.raises(ImportError, match=r"robustbench 1.1.1's files were overwritten \(1 differ .* "
                       r"robustbench/__init__.py.*--force-reinstall --no-deps 'robustbench==1.1.1'"):
        robustbench_classifier("Standard", str(tmp_path))


def test_a_robustbench_folder_without_the_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "robustbench").mkdir()
    (tmp_path / "robustbench" / "__init__.py").write_text("")
    if _installed():
        pytest.skip("the real robustbench package is installed")
    _use(monkeypatch, tmp_path)
    with pytest.raises(ImportError, match=r"not the robustbench package .* pip install 'ssni\[robustbench\]'"):
        robustbench_classifier("Standard", str(tmp_path))


def test_a_missing_install_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(ImportError, match=r"need the optional extra: pip install 'ssni\[robustbench\]'"):
        robustbench_classifier("Standard", "x")
