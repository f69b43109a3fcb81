import pytest
import torch

from ssni.models import MODELS, create_model, list_models, load_model, save_model


def _small(name):
    # the CIFAR-sized model is checked at reduced width so the suite stays fast
    return {"ch": 16} if MODELS.meta(name).get("kind") == "score" and name == "ddpmpp_cifar10" else {}


@pytest.mark.parametrize("name", list_models(kind="score"))
def test_every_unet_per_sample_t(name):
    torch.manual_seed(0)
    m = create_model(name, **_small(name)).eval()  # eval: dropout off for exact comparisons
    x = torch.randn(3, *m.input_shape, requires_grad=True)
    t = torch.tensor([0.01, 0.5, 0.99])
    out = m(x, t)
    assert out.shape == x.shape
    # per-sample t: each sample's output equals the output computed alone
    for k in range(3):
        torch.testing.assert_close(m(x[k:k + 1], t[k:k + 1]), out[k:k + 1], atol=1e-5, rtol=1e-4)
    # the time input matters (after perturbing the zero-initialised layers)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = m(x, t)
    a, b = m(x, t), m(x, t.flip(0))
    assert not torch.allclose(a, b)
    a.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    s = m.score(x.detach(), t)
    torch.testing.assert_close(s, -m(x.detach(), t) / m.diffusion.sigma(t).view(3, 1, 1, 1))


def test_cifar_model_is_ddpmpp_size_class():
    m = create_model("ddpmpp_cifar10")
    n = sum(p.numel() for p in m.parameters())
    assert 55e6 < n < 70e6  # the public VP DDPM++ (continuous) model has about 62M


def test_save_and_load_roundtrip(tmp_path):
    m = create_model("unet_tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    save_model(tmp_path / "ck", m)
    m2 = load_model(tmp_path / "ck")
    x, t = torch.randn(2, *m.input_shape), torch.rand(2)
    torch.testing.assert_close(m.eval()(x, t), m2(x, t))


def test_unknown_model_lists_choices():
    with pytest.raises(KeyError, match="unet_tiny"):
        create_model("no_such_net")


def test_wrong_input_shape_is_clear():
    m = create_model("unet_tiny")
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        m.check_input(torch.zeros(2, 3, 8, 8))
