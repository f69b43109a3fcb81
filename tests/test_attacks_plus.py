"""Attack extras: torchattacks' calling convention, targeted mode, selective EOT, the low-frequency
attack, and the majority-vote / worst-over-attacks metrics."""
import pytest
import torch
from torch import nn

from ssni.attacks import (
    APGD,
    ATTACKS,
    EOT,
    PGD,
    EOTGradient,
    LowFreqPGD,
    SelectiveEOTGradient,
    plain_gradient,
    targeted_loss,
)
from ssni.attacks.base import LOSSES
from ssni.evaluate.metrics import majority_vote_accuracy, wilson_interval, worst_case


def _toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, 4, 4), 0.3) + 0.4 * y.view(-1, 1, 1, 1).float()
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), y


def _linear(features=16, classes=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).eval().requires_grad_(False)


# -- torchattacks' convention ---------------------------------------------------------------------

def test_torchattacks_convention_matches_ours():
    net = _linear()
    x, y = _toy_data()
    ours = PGD(eps=0.1, step_size=0.02, steps=5)(net, x, y, seed=3)
    theirs = PGD(net, eps=0.1, alpha=0.02, steps=5, seed=3)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours, x)
    # no seed anywhere: the random start follows torch's global RNG in both conventions
    torch.manual_seed(1)
    a = PGD(net, eps=0.1, alpha=0.02, steps=3, random_start=True).forward(x, y)
    torch.manual_seed(1)
    b = PGD(eps=0.1, step_size=0.02, steps=3)(net, x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # APGD, torchattacks spelling of the norm, and its constructor seed
    a = APGD(net, norm="Linf", eps=0.1, steps=6, loss="ce", seed=0)(x, y)
    b = APGD(eps=0.1, steps=6, loss="ce")(net, x, y, seed=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert PGD(alpha=0.3).step_size == 0.3 and PGD(step_size=0.3, alpha=0.3).step_size == 0.3
    with pytest.raises(ValueError, match="alias"):
        PGD(step_size=0.1, alpha=0.2)
    with pytest.raises(TypeError, match="needs a model"):
        PGD(eps=0.1)(x, y)


def test_torchattacks_style_attack_on_defense_view():
    from ssni.defense import wrap_timm
    from ssni.models.analytic import GaussianScoreModel
    from ssni.scoring import ScoreNormConfig, calibrate

    shape, sn = (1, 8, 8), ScoreNormConfig(timesteps=4)
    sm = GaussianScoreModel(mean=0.1, std=0.4, shape=shape)
    g = torch.Generator().manual_seed(0)
    x = (0.55 + 0.15 * torch.randn(4, *shape, generator=g)).clamp(0, 1)
    cal, _ = calibrate(sm, (0.55 + 0.15 * torch.randn(16, *shape, generator=g)).clamp(0, 1), sn, batch_size=16)
    torch.manual_seed(0)
    defense = wrap_timm("resnet10t", score_model=sm, calibration=cal, reweight="sigmoid",
                        reweight_kwargs={"t_base": 0.1}, purifier_config={"sampler": "ddpm", "steps": 2},
                        score_norm=sn, num_classes=3, input_size=8)
    y = torch.tensor([0, 1, 2, 0])
    for attack in (PGD(defense.view("full"), eps=8 / 255, alpha=2 / 255, steps=2),
                   APGD(defense.view("full"), eps=8 / 255, steps=2, loss="ce", seed=0)):
        x_adv = attack(x, y)
        assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert not torch.equal(x_adv, x)


# -- targeted mode --------------------------------------------------------------------------------

def test_targeted_losses_hand_values():
    z = torch.tensor([[3.0, 1.0, 0.0]])
    t = torch.tensor([1])
    assert targeted_loss(LOSSES.get("margin"))(z, t).item() == pytest.approx(1.0 - 3.0)
    assert targeted_loss(LOSSES.get("ce"))(z, t).item() == pytest.approx(-LOSSES.get("ce")(z, t).item())
    attack = PGD(targeted=True, loss="margin")
    assert getattr(attack.loss, "targeted", False) and attack.describe()["targeted"]
    attack.set_mode_default()
    assert not getattr(attack.loss, "targeted", False)


@pytest.mark.parametrize("make", [
    lambda t: PGD(eps=0.25, steps=15, step_size=0.03, targeted=t),
    lambda t: PGD(eps=0.25, steps=15, step_size=0.03, loss="margin", targeted=t),
    lambda t: APGD(eps=0.25, steps=15, loss="ce", targeted=t),
    lambda t: APGD(eps=0.25, steps=15, loss="margin", targeted=t),
])
def test_targeted_attack_reaches_the_target_more_often(make):
    net = _linear(classes=5, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 4, 4, generator=g) * 0.5 + 0.25
    pred = net(x).argmax(1)
    target = (pred + 1 + torch.randint(0, 4, pred.shape, generator=g)) % 5  # never the current class
    hit_t = (net(make(True)(net, x, target, seed=0)).argmax(1) == target).float().mean().item()
    hit_u = (net(make(False)(net, x, pred, seed=0)).argmax(1) == target).float().mean().item()
    assert hit_t > hit_u + 0.2 and hit_t > 0.5


def test_torchattacks_targeted_switch():
    net = _linear(classes=5, seed=1)
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    target = (net(x).argmax(1) + 2) % 5
    atk = PGD(net, eps=0.25, alpha=0.03, steps=15, seed=0)
    atk.set_mode_targeted_by_label()
    torch.testing.assert_close(atk(x, target), PGD(eps=0.25, step_size=0.03, steps=15, targeted=True)(
        net, x, target, seed=0), rtol=0, atol=0)


# -- selective EOT --------------------------------------------------------------------------------

class ShiftedDraws(nn.Module):
    """A 'randomized' toy model: the r-th row it ever sees (cyclically) gets shifts[r] added to its logits."""

    def __init__(self, net, shifts):
        super().__init__()
        self.net, self.shifts, self.seen = net, shifts, 0

    def forward(self, x):
        rows = (self.seen + torch.arange(x.shape[0])) % self.shifts.shape[0]
        self.seen += x.shape[0]
        return self.net(x) + self.shifts[rows]


def test_selective_eot_averages_only_the_resisting_draws():
    net = _linear(seed=2)
    x, _ = _toy_data(4, seed=1)
    y = net(x).argmax(1)
    samples, b = 3, 4
    # per (draw, sample) shift: +5 on another class fools that draw, 0 leaves it correct
    fooled = torch.tensor([[1, 0, 1, 1],
                           [0, 0, 1, 1],
                           [1, 0, 1, 0]], dtype=torch.bool)  # sample 2: every draw fooled -> fallback
    other = 1 - y
    shifts = torch.zeros(samples, b, 2)
    shifts[fooled] = 5.0 * nn.functional.one_hot(other, 2).float().expand(samples, b, 2)[fooled]
    model = ShiftedDraws(net, shifts.reshape(samples * b, 2))
    loss = LOSSES.get("ce")
    per_draw = torch.stack([plain_gradient(ShiftedDraws(net, shifts[k]), x, y, loss)[1] for k in range(samples)])
    _, g_sel, _ = SelectiveEOTGradient(samples)(model, x, y, loss)
    _, g_all, _ = EOTGradient(samples)(model, x, y, loss)
    keep = (~fooled).float()
    expect = (keep[:, :, None, None, None] * per_draw).sum(0) / keep.sum(0).clamp_min(1)[:, None, None, None]
    expect[2] = per_draw[:, 2].mean(0)
    torch.testing.assert_close(g_sel, expect)
    torch.testing.assert_close(g_all, per_draw.mean(0))
    assert not torch.allclose(g_sel, g_all)
    # chunked into one copy per call, the streaming sums give the same answer
    model.seen = 0
    torch.testing.assert_close(SelectiveEOTGradient(samples, max_batch=4)(model, x, y, loss)[1], expect)


def test_selective_eot_wraps_an_attack():
    attack = EOT(PGD(eps=0.1, steps=3, step_size=0.05), samples=4, selective=True)
    assert isinstance(attack.grad_fn, EOTGradient) and attack.grad_fn.selective
    assert attack.describe()["eot_selective"] and attack.eot_samples == 4
    net = _linear()
    x, y = _toy_data(8)
    x_adv = attack(nn.Sequential(nn.Dropout(0.3).train(), net), x, y, seed=0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


# -- low-frequency attack -------------------------------------------------------------------------

def _high_freq_fraction(d, cutoff):
    e = torch.fft.fft2(d).abs().pow(2)
    f = torch.fft.fftfreq(d.shape[-1]) * d.shape[-1]
    hi = (f.abs()[:, None] > cutoff) | (f.abs()[None, :] > cutoff)
    return ((e * hi).sum() / e.sum()).item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_lowfreq_perturbation_is_smooth_and_in_the_ball(norm, eps):
    net = _linear(features=256, seed=0)
    x = (0.5 + 0.1 * torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    y = net(x).argmax(1)
    attack = ATTACKS.create("lowfreq", eps=eps, norm=norm, steps=10, step_size=eps / 4, factor=4)
    assert isinstance(attack, LowFreqPGD)
    d = attack(net, x, y, seed=0) - x
    size = d.flatten(1).abs().amax(1) if norm == "linf" else d.flatten(1).norm(dim=1)
    assert torch.all(size <= eps + 1e-5) and (x + d).min() >= 0 and (x + d).max() <= 1
    assert size.max() > eps / 2  # it moved
    d_pgd = PGD(eps=eps, norm=norm, steps=10, step_size=eps / 4)(net, x, y, seed=0) - x
    low, full = _high_freq_fraction(d, 2), _high_freq_fraction(d_pgd, 2)  # above the 4x4 grid's Nyquist
    assert low < 0.25 and full > 0.5


def test_lowfreq_on_tiny_images_and_bad_factor():
    net = _linear()
    x, y = _toy_data(8)
    x_adv = LowFreqPGD(net, eps=0.1, alpha=0.05, steps=3, factor=8)(x, y)  # 4x4 image, a 1x1 delta
    d = x_adv - x
    assert torch.allclose(d, d.mean((2, 3), keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="factor"):
        LowFreqPGD(factor=0)


# -- metrics --------------------------------------------------------------------------------------

def test_majority_vote_hand_values():
    pred = torch.tensor([[1, 1, 2, 1],   # majority 1: right
                         [0, 2, 2, 0],   # tie 0 / 2: wrong even though 0 is right
                         [3, 3, 3, 3],   # majority 3, label 1: wrong
                         [2, 0, 1, 2]])  # majority 2: right
    y = torch.tensor([1, 0, 1, 2])
    m = majority_vote_accuracy(pred, y)
    assert m["majority"] == pytest.approx(0.5) and m["n"] == 4 and m["draws"] == 4
    assert m["correct"].tolist() == [True, False, False, True]
    assert m["majority_ci"] == pytest.approx(wilson_interval(2, 4))
    with pytest.raises(ValueError, match="samples, draws"):
        majority_vote_accuracy(torch.zeros(4, dtype=torch.long), y)
    with pytest.raises(ValueError, match="one label per sample"):
        majority_vote_accuracy(pred, y[:3])


def test_worst_case_over_attacks_hand_values():
    apgd = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    pgd = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # other draw count
    w = worst_case({"apgd": apgd, "pgd": pgd})
    assert w["robust"].tolist() == [True, False, False, False]
    assert w["per_sample"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])
    assert w["worst_of_n"] == pytest.approx(0.25) and w["worst_of_n_ci"] == pytest.approx(wilson_interval(1, 4))
    assert w["expected"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert w["by_attack"] == pytest.approx({"apgd": 5 / 8, "pgd": 10 / 12})
    assert w["expected"] <= min(w["by_attack"].values())
    with pytest.raises(ValueError, match="samples"):
        worst_case({"a": apgd, "b": pgd[:3]})
    with pytest.raises(ValueError, match="at least one"):
        worst_case({})
