"""`ssni.models.load_network`, the one entry point for weights: run and checkpoint directories, weights
files, public checkpoints {format, path, ...}, and modules; a network of the wrong kind is one line."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ssni.checkpoint import save_checkpoint
from ssni.defense import ClassifierRef, load_classifier, load_score_model  # still importable from defense
from ssni.models import (
    VPBackbone,
    classifier_spec,
    create_classifier,
    create_model,
    load_network,
    model_spec,
    save_model,
)
from ssni.models.load import kind_of

FIXTURES = Path(__file__).parent / "fixtures"


def _perturbed(model, seed):
    """The model with every weight moved by noise: two copies then differ, so a test can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def score_run(tmp_path):
    """A run directory as training writes it: checkpoints/step_N with model and EMA weights, latest.json."""
    net, ema = _perturbed(create_model("unet_tiny"), 0), _perturbed(create_model("unet_tiny"), 1)
    save_checkpoint(tmp_path / "score" / "checkpoints", 5, net, ema, None, model_spec(net))
    return tmp_path / "score", net, ema


@pytest.fixture
def classifier_run(tmp_path):
    clf = _perturbed(create_classifier("resnet10t", in_chans=1, num_classes=3, image_size=8), 2)
    save_checkpoint(tmp_path / "clf" / "checkpoints", 3, clf, None, None, classifier_spec(clf))
    return tmp_path / "clf", clf


def test_a_score_run_directory_loads_ema_weights_unless_told_otherwise(score_run):
    run, net, ema = score_run
    auto = load_network(run, kind="score")
    assert auto.loaded_weights == "ema" and _same_weights(auto, ema) and not auto.training
    raw = load_network(run, kind="score", weights="model")
    assert raw.loaded_weights == "model" and _same_weights(raw, net)
    assert _same_weights(load_score_model(run), ema)  # the defense's loader is the same entry point
    # one weights file of the checkpoint: its model.json gives the architecture, its name the weights
    step = run / "checkpoints" / "step_00000005"
    assert _same_weights(load_network(step / "model.safetensors", kind="score"), net)
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([0.3, 0.7])
    assert auto(x, t).shape == (2, 1, 8, 8)


def test_a_classifier_run_directory_loads_as_a_classifier(classifier_run):
    run, clf = classifier_run
    model = load_network(run, kind="classifier")
    assert kind_of(model) == "classifier" and model.model_name == "resnet10t" and _same_weights(model, clf)
    assert _same_weights(load_classifier(ClassifierRef(checkpoint=str(run)), 1, 8), clf)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_fills_the_network_it_belongs_to(tmp_path, classifier_run, suffix):
    _, clf = classifier_run
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": clf.state_dict()}, path)  # the common {"state_dict": ...} wrapper
    else:
        from ssni.io import atomic_save_safetensors

        atomic_save_safetensors(path, clf.state_dict())
    into = create_classifier("resnet10t", in_chans=1, num_classes=3, image_size=8)
    assert load_network(path, kind="classifier", into=into) is into and _same_weights(into, clf)
    ref = ClassifierRef(name="resnet10t", checkpoint=str(path), num_classes=3)
    assert _same_weights(load_classifier(ref, 1, 8), clf)


def test_a_public_checkpoint_loads_from_a_format_and_path(tmp_path):
    """A guided-diffusion state dict (random weights in the original's names and shapes) as {format, path, flags}."""
    fix = json.loads((FIXTURES / "guided_tiny_conv_keys.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {k: 0.05 * torch.randn(s, generator=g) for k, s in fix["shapes"].items()}
    torch.save(state, tmp_path / "guided.pt")
    spec = {"format": "guided_diffusion", "path": str(tmp_path / "guided.pt"), **fix["flags"]}
    model = load_network(spec, kind="score")
    assert isinstance(model, VPBackbone) and model.input_shape == (3, 32, 32) and not model.training
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"holds a score network \(VPBackbone\), not a classifier"):
        load_network(spec, kind="classifier")
    with pytest.raises(ValueError, match=r"score_model \{'path': 'x.pt'\} must name format and path"):
        load_score_model({"path": "x.pt"})


def _one_line(info):
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_a_network_of_the_wrong_kind_is_one_line_naming_both(score_run, classifier_run):
    (score, _, _), (clf, _) = score_run, classifier_run
    with pytest.raises(ValueError) as info:
        load_score_model(clf)
    assert _one_line(info).startswith(f"score_model {clf} holds a classifier (resnet10t), not a score network; "
                                      "expected a `ssni train-score` run")
    with pytest.raises(ValueError) as info:
        load_classifier(ClassifierRef(checkpoint=str(score)), 1, 8)
    assert _one_line(info).startswith(f"classifier.checkpoint {score} holds a score network (unet_tiny), "
                                      "not a classifier; expected a `ssni train-classifier` run")
    with pytest.raises(ValueError) as info:
        load_network(score, kind="denoiser")
    assert _one_line(info) == "kind must be one of score, classifier or None, got 'denoiser'"


def test_a_module_passes_through_unchecked():
    net = nn.Linear(2, 2)
    assert load_network(net) is net
    assert load_network(net, kind="score") is net  # the caller built it: no kind to check against


def test_what_cannot_be_loaded_says_what_is_expected(tmp_path, score_run):
    score, _, _ = score_run
    save_model(tmp_path / "ckpt", create_model("unet_tiny"))
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((tmp_path / "ckpt" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError) as info:
        load_network(loose)  # no model.json beside it and no network to fill
    assert "no ssni model.json beside it; pass into=<the network it belongs to>" in _one_line(info)
    with pytest.raises(ValueError, match="into= is for a weights file, but .* is not a file"):
        load_network(score, into=create_model("unet_tiny"))
    with pytest.raises(ValueError, match="does not fit the timm model: missing"):  # another network's weights
        load_network(loose, into=create_classifier("resnet10t", in_chans=1, num_classes=3, image_size=8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_network(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_network(tmp_path / "absent.pt", into=create_model("unet_tiny"))
