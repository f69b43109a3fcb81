"""RobustBench classifiers from local files, as `robustbench.utils.load_model` reads them (robustbench 1.1.1).

    pip install 'ssni[robustbench]'
    robustbench_classifier("Standard", model_dir="checkpoints/robustbench")   # cifar10 / Linf

The network is robustbench's own (its model zoo builds it); the weights file is the one its
`load_model` keeps, <model_dir>/<dataset>/<threat_model>/<name>.pt (ensembles: <name>.pt_m<i>.pt), read
here with torch.load(weights_only=True) (numpy scalars allowed, see ssni.io.safe_torch_load) and
never downloaded. What `load_model` does to the file's contents is done the same way: the
`state_dict` entry when there is one (`last` for two models), the substrings `module.` and then
`model.` removed as its `rm_substr_from_state_dict` removes them (a key that contains one loses its
first len(substring) characters), `model.` put back for ImageNet models that wrap a normaliser, and
the strict load that its `_safe_load_state_dict` relaxes for a few known models.

Not read, with a one-line error: entries hosted on the timm hub (robustbench downloads them through
timm.create_model(pretrained=True)), ImageNet's Standard_R50 (torchvision weights downloaded while the
model is built), and the two ensembles with their own loading code (Bai2023Improving_*, Bai2024MixedNUTS).

robustbench 1.1.1 from the package index has packaging faults, worked around here only while it is
imported and without writing into site-packages:
- it imports `autoattack` and `autoattack.state`, but its dependency pyautoattack installs the module as
  `pyautoattack` (and torchattacks installs an older top-level `autoattack` without `state`): where no
  `autoattack` with `state` is there, sys.modules maps autoattack -> pyautoattack during the import;
- it imports `pkg_resources`, which setuptools >= 81 no longer has: the extra pins setuptools < 81, and
  where it is missing anyway a stand-in provides the one function robustbench uses.
It also pins timm==1.0.9, which the extra therefore installs.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

from torch import Tensor, nn

from ..io import safe_torch_load
from .pretrained import describe_mismatch

ROBUSTBENCH_EXTRA = "RobustBench classifiers need the optional extra: pip install 'ssni[robustbench]'"

# robustbench 1.1.1's load_model: models whose file keeps its weights under 'last'
_LAST = ("Andriushchenko2020Understanding",)
# ... ImageNet models whose state dict is not put under the normalising wrapper's `model.`
_IMAGENET_NO_PREFIX = (
    "Singh2023Revisiting_ConvNeXt-T-ConvStem", "Singh2023Revisiting_ViT-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-S-ConvStem", "Singh2023Revisiting_ConvNeXt-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-L-ConvStem", "Peng2023Robust", "Chen2024Data_WRN_50_2",
    "Xu2024MIMIR_Swin-B", "Xu2024MIMIR_Swin-L")
# ... ImageNet Swin models whose state dict timm's checkpoint_filter_fn adapts
_IMAGENET_SWIN = ("Liu2023Comprehensive_Swin-B", "Liu2023Comprehensive_Swin-L", "Mo2022When_Swin-B",
                  "RodriguezMunoz2024Characterizing_Swin-B", "RodriguezMunoz2024Characterizing_Swin-L")
# ... ensembles that load their parts with code of their own
_CUSTOM_ENSEMBLES = ("Bai2023Improving", "Bai2024MixedNUTS")


def _present(name: str) -> bool:
    """Whether the top-level module `name` can be imported (a None in sys.modules means absent)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _autoattack_with_state() -> bool:
    """Whether an `autoattack` with the `state` module robustbench imports is there (without importing it).

    torchattacks installs an older top-level `autoattack` without it; pyautoattack, robustbench's own
    dependency, installs the module as `pyautoattack`.
    """
    module = sys.modules.get("autoattack")
    if module is not None:
        if "autoattack.state" in sys.modules:
            return True
        folders = list(getattr(module, "__path__", []))
    else:
        try:
            spec = importlib.util.find_spec("autoattack")
        except (ImportError, ValueError):
            return False
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(f) / "state.py").is_file() or (Path(f) / "state").is_dir() for f in folders)


def _resource_filename(package: str, path: str) -> str:
    """pkg_resources.resource_filename: `path` inside the folder of module or package `package`."""
    module = importlib.import_module(package)
    folder = Path(next(iter(module.__path__))) if hasattr(module, "__path__") else Path(module.__file__).parent
    return str(folder / path)


def _pkg_resources_stand_in() -> types.ModuleType:
    """A `pkg_resources` with `resource_filename`, the one function robustbench uses."""
    module = types.ModuleType("pkg_resources")
    module.resource_filename = _resource_filename  # type: ignore[attr-defined]
    return module


_ABSENT = object()


@contextlib.contextmanager
def _import_fixes() -> Iterator[None]:
    """sys.modules aliases for robustbench's packaging faults, present only inside this block."""
    added: Dict[str, Any] = {}
    if not _autoattack_with_state() and _present("pyautoattack"):
        import pyautoattack
        import pyautoattack.state

        added.update({"autoattack": pyautoattack, "autoattack.state": pyautoattack.state})
    if not _present("pkg_resources"):
        added["pkg_resources"] = _pkg_resources_stand_in()
    before = {name: sys.modules.get(name, _ABSENT) for name in added}
    sys.modules.update(added)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated", category=UserWarning)
            yield
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                if before[name] is _ABSENT:
                    del sys.modules[name]
                else:
                    sys.modules[name] = before[name]


def _file_hash(path: Path) -> str:
    """A file's sha256 as a wheel's RECORD writes it (urlsafe base64, no padding)."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def check_robustbench_install() -> None:
    """ImportError unless the robustbench package is installed and its files are its own.

    torchattacks installs an old copy of robustbench's modules into the same `robustbench` folder,
    without robustbench's metadata: alone, that copy is not robustbench (it does not import); next to
    robustbench, whichever was installed last overwrote the other's files. The files are compared
    with the hashes in robustbench's RECORD.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("robustbench")
    except metadata.PackageNotFoundError:
        if _present("robustbench"):
            raise ImportError(f"the `robustbench` module here is not the robustbench package (torchattacks installs "
                              f"an old copy of it): {ROBUSTBENCH_EXTRA}") from None
        raise ImportError(ROBUSTBENCH_EXTRA) from None
    changed = []
    for file in dist.files or []:
        if file.hash is None or file.hash.mode != "sha256" or file.suffix != ".py" or file.parts[0] != "robustbench":
            continue
        path = Path(file.locate())
        if not path.is_file() or _file_hash(path) != file.hash.value:
            changed.append(str(file))
    if changed:
        raise ImportError(f"robustbench {dist.version}'s files were overwritten ({len(changed)} differ from its "
                          f"RECORD, e.g. {changed[0]}; torchattacks installs an old robustbench into the same "
                          f"folder): pip install --force-reinstall --no-deps 'robustbench=={dist.version}'")


def import_robustbench() -> Tuple[Any, Any]:
    """(robustbench.model_zoo.models, robustbench.model_zoo.enums), imported around its packaging faults.

    Not installed: ImportError naming the extra. Installed but failing to import, or its files
    overwritten: ImportError with that error first.
    """
    if not _present("robustbench"):
        raise ImportError(ROBUSTBENCH_EXTRA)
    if "robustbench" not in sys.modules:  # not imported yet (or stood in for, as some tests do)
        check_robustbench_install()
    try:
        with _import_fixes():
            models = importlib.import_module("robustbench.model_zoo.models")
            enums = importlib.import_module("robustbench.model_zoo.enums")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImportError(f"robustbench is installed but does not import: {type(e).__name__}: {first} "
                          f"(reinstall the extra: pip install 'ssni[robustbench]')") from e
    return models, enums


def rm_substr(state: Dict[str, Tensor], substr: str) -> Dict[str, Tensor]:
    """robustbench's rm_substr_from_state_dict: a key containing `substr` loses its first len(substr)
    characters (meant for a leading `module.` / `model.`, and applied as robustbench applies it)."""
    return {(k[len(substr):] if substr in k else k): v for k, v in state.items()}


def _state_of(checkpoint: Any, path: Path) -> Dict[str, Tensor]:
    """The {name: tensor} inside a loaded file: its 'state_dict' entry when it has one, else itself."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        what = f"a dict with keys {list(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected a state dict (or {{'state_dict': ...}}), as RobustBench's files hold; "
                         f"the file holds {what}")
    return state


def _load_checked(model: nn.Module, state: Dict[str, Tensor], name: str, dataset: Any, path: Path,
                  cfg: Dict[str, Any]) -> None:
    """Strict load; where it fails, robustbench's own _safe_load_state_dict decides (it loads a few known
    models non-strictly), else the mismatch is raised as ssni's one-line-first error."""
    problem = describe_mismatch(model, state, "robustbench", cfg)
    if problem is None:
        model.load_state_dict(state)
        return
    try:
        utils = importlib.import_module("robustbench.utils")  # already imported with the model zoo
        utils._safe_load_state_dict(model, name, state, dataset)
    except (ImportError, AttributeError, RuntimeError):
        raise ValueError(f"{path} does not fit the robustbench model: {problem}") from None


def robustbench_classifier(name: str, model_dir: str, dataset: str = "cifar10",
                           threat_model: str = "Linf") -> nn.Module:
    """A RobustBench model built by robustbench, weights read from model_dir (weights_only), in eval mode.

    The file RobustBench's own `load_model` would use, <model_dir>/<dataset>/<threat_model>/
    <name>.pt, must already be there (fetch it once with robustbench); nothing is downloaded here.
    RobustBench models take images in [0, 1] and normalise themselves.
    """
    rb_models, enums = import_robustbench()
    dataset_ = enums.BenchmarkDataset(dataset)
    threat_ = enums.ThreatModel(enums.ThreatModel(threat_model).value.replace("_3d", ""))  # as load_model
    table = rb_models.model_dicts[dataset_][threat_]
    if name not in table:
        raise ValueError(f"unknown RobustBench {dataset}/{threat_model} model {name!r}; e.g. "
                         f"{', '.join(sorted(table)[:8])}")
    entry = table[name]
    timm_name = f"{name.lower().replace('-', '_')}_{dataset_.value.lower()}_{threat_.value.lower()}"
    import timm

    if timm.is_model(timm_name):
        raise ValueError(f"RobustBench {dataset}/{threat_model} model {name!r} is hosted on the timm hub as "
                         f"{timm_name!r} (robustbench downloads it with timm.create_model(pretrained=True)); "
                         f"ssni reads local RobustBench files only: not supported")
    gdrive = entry.get("gdrive_id", "")
    if gdrive is None:
        raise ValueError(f"RobustBench {dataset}/{threat_model} model {name!r} has no weights file of its own "
                         f"(no gdrive_id, not a timm model): not supported")
    if dataset_.value == "imagenet" and "Standard" in name:
        raise ValueError(f"RobustBench imagenet model {name!r} is torchvision's pretrained network, downloaded while "
                         f"robustbench builds it: not supported; load torchvision's weights file with "
                         f"classifier source timm instead")
    if isinstance(gdrive, list) and name.startswith(_CUSTOM_ENSEMBLES):
        raise ValueError(f"RobustBench {dataset}/{threat_model} model {name!r} is an ensemble that robustbench "
                         f"loads with code of its own (parts into comp_model / std_model / rob_model): not supported")
    folder = Path(model_dir) / dataset_.value / threat_.value
    path = folder / f"{name}.pt"
    files = [Path(f"{path}_m{i}.pt") for i in range(len(gdrive))] if isinstance(gdrive, list) else [path]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"RobustBench weights not found: {file} (download them once with "
                                    f"robustbench.utils.load_model(model_name={name!r}, model_dir=..., "
                                    f"dataset={dataset!r}, threat_model={threat_model!r}))")
    cfg = {"name": name, "dataset": dataset, "threat_model": threat_model}
    model = entry["model"]()
    if isinstance(gdrive, list):  # an ensemble: file i holds model.models[i] (only `module.` removed)
        for i, file in enumerate(files):
            _load_checked(model.models[i], rm_substr(_state_of(safe_torch_load(file), file), "module."),
                          name, dataset_, file, cfg)
    else:
        checkpoint = safe_torch_load(path)
        if "Kireev2021Effectiveness" in name or name in _LAST:
            checkpoint = checkpoint["last"]  # robustbench takes the last model (of 'last' and 'best')
        state = rm_substr(rm_substr(_state_of(checkpoint, path), "module."), "model.")
        if dataset_.value == "imagenet":
            if name in _IMAGENET_SWIN:
                try:
                    from timm.models.swin_transformer import checkpoint_filter_fn
                    state = checkpoint_filter_fn(state, model.model)
                except Exception:  # robustbench ignores a failure here too
                    pass
            if name not in _IMAGENET_NO_PREFIX:
                state = {"model." + k: v for k, v in state.items()}
        _load_checked(model, state, name, dataset_, path, cfg)
    model.eval()
    model.model_name = name
    return model


__all__ = ["ROBUSTBENCH_EXTRA", "check_robustbench_install", "import_robustbench", "rm_substr", "robustbench_classifier"]
