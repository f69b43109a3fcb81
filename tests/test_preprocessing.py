"""The classifier's preprocessing contract: stated or read from timm, never a silent default."""
import pytest
import torch
from torch import nn

from ssni.defense import resolve_preprocessing, wrap_timm
from ssni.models import create_model

SHAPE = (1, 8, 8)


class Recorder(nn.Module):
    """A non-timm classifier that records the batches it receives."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(144, 10)  # 1 x 12 x 12 inputs
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def _score():
    torch.manual_seed(0)
    return create_model("unet_tiny")


def test_a_non_timm_classifier_without_an_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not a timm model.*pass input_size"):
        resolve_preprocessing(Recorder(), 1)
    with pytest.raises(ValueError, match="input_size"):
        wrap_timm(Recorder(), score_model=_score(), reweight="constant",
                  purifier_config={"sampler": "ddpm", "steps": 1})


def test_a_non_timm_classifier_is_fed_at_its_own_size_and_normalisation():
    clf = Recorder()
    w = wrap_timm(clf, score_model=_score(), reweight="constant", reweight_kwargs={"t_base": 0.0},
                  purifier_config={"sampler": "ddpm", "steps": 1}, input_size=12, mean=[0.5], std=[0.25])
    x = torch.full((2, *SHAPE), 0.75)
    with torch.no_grad():
        w(x, seeds=torch.arange(2))
    got = clf.seen[-1]
    assert got.shape == (2, 1, 12, 12)  # its own size, not 224
    torch.testing.assert_close(got, torch.full_like(got, 1.0))  # (0.75 - 0.5) / 0.25


def test_a_non_timm_classifier_that_normalises_itself_gets_pixels_in_0_1():
    size, mean, std = resolve_preprocessing(Recorder(), 3, input_size=32)
    assert size == (32, 32) and mean == [0.0] * 3 and std == [1.0] * 3


def test_a_timm_model_keeps_its_pretrained_cfg():
    import timm

    m = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    size, mean, std = resolve_preprocessing(m, 3)
    assert size == tuple(m.pretrained_cfg["input_size"][1:])
    assert mean == pytest.approx(list(m.pretrained_cfg["mean"]))


def _fake_robustbench(monkeypatch):
    """A stand-in for the robustbench package: one CIFAR-10 Linf model, the real table layout."""
    import enum
    import sys
    import types

    class BenchmarkDataset(enum.Enum):
        cifar_10 = "cifar10"

    class ThreatModel(enum.Enum):
        Linf = "Linf"

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    models = types.SimpleNamespace(model_dicts={BenchmarkDataset.cifar_10: {ThreatModel.Linf: {
        "Standard": {"model": Tiny}}}})
    enums = types.SimpleNamespace(BenchmarkDataset=BenchmarkDataset, ThreatModel=ThreatModel)
    for name, mod in (("robustbench", types.ModuleType("robustbench")),
                      ("robustbench.model_zoo", types.SimpleNamespace(models=models, enums=enums)),
                      ("robustbench.model_zoo.models", models), ("robustbench.model_zoo.enums", enums)):
        monkeypatch.setitem(sys.modules, name, mod)
    return Tiny


def test_a_robustbench_classifier_loads_from_its_model_dir_and_normalises_itself(tmp_path, monkeypatch):
    from ssni.defense import ClassifierRef, load_classifier

    tiny = _fake_robustbench(monkeypatch)
    ref = ClassifierRef(source="robustbench", name="Standard",
                        kwargs={"model_dir": str(tmp_path), "dataset": "cifar10", "threat_model": "Linf"})
    with pytest.raises(FileNotFoundError, match="RobustBench weights not found"):
        load_classifier(ref, 3, 32)
    src = tiny()
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "cifar10" / "Linf" / "Standard.pt")
    clf = load_classifier(ref, 3, 32)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clf(x), src(x))
    assert resolve_preprocessing(clf, 3, input_size=32) == ((32, 32), [0.0] * 3, [1.0] * 3)


def test_robustbench_missing_names_the_extra(monkeypatch):
    import sys

    from ssni.models.classifier import robustbench_classifier

    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(ImportError, match=r"ssni\[robustbench\]"):
        robustbench_classifier("Standard", "x")


@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp32", 1e-5)])  # channels_last: other conv kernels
def test_score_network_speed_options_keep_eps_close_to_fp32(precision, tol):
    torch.manual_seed(0)
    ref = create_model("unet_tiny")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = create_model("unet_tiny")
    fast.load_state_dict(ref.state_dict())
    fast.set_speed(precision, channels_last=True)
    x, t = torch.rand(4, *SHAPE) * 2 - 1, torch.tensor([0.01, 0.1, 0.5, 0.9])
    with torch.no_grad():
        a, b = ref(x, t), fast(x, t)
    assert b.dtype == torch.float32
    assert ((a - b).norm() / a.norm()).item() <= tol
    with pytest.raises(ValueError, match="precision"):
        fast.set_speed("int8")


def test_compile_option_keeps_checkpoint_keys():
    # a torch.compile wrapper module would prefix every key with "_orig_mod." and break saving and
    # loading ssni checkpoints; set_speed compiles in place (lazily: nothing is compiled here)
    m = create_model("unet_tiny")
    keys = list(m.state_dict())
    m.set_speed(compile=True)
    assert m.compiled and m._compiled_call_impl is not None
    assert list(m.state_dict()) == keys
    m.load_state_dict(create_model("unet_tiny").state_dict())
