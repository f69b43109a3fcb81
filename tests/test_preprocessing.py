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
