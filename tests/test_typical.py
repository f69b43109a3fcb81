"""Typical-set utilities and the TS noise sampler: concentration, shell membership, radii."""
import math
from pathlib import Path

import pytest
import torch

from ssni.noise import NOISE_SAMPLERS
from ssni.training import DSMLoss
from ssni.typical import (
    TypicalSetNoise,
    exact_expected_norm,
    expected_norm,
    in_typical_set,
    noise_with_radii,
    random_directions,
    shell_probability,
    typical_shell,
    typicality_statistic,
)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: a second thread only adds scheduling overhead on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_expected_norm_formulas():
    assert expected_norm(100, 2.0) == pytest.approx(20.0)
    # chi distribution mean, by hand for d = 1 and d = 2: sqrt(2/pi) and sqrt(pi/2)
    assert exact_expected_norm(1) == pytest.approx(math.sqrt(2 / math.pi))
    assert exact_expected_norm(2, 3.0) == pytest.approx(3.0 * math.sqrt(math.pi / 2))
    # E||n|| < s sqrt(d) (Jensen) and the gap vanishes relative to sqrt(d)
    for d in (4, 64, 4096):
        assert exact_expected_norm(d) < expected_norm(d)
    assert exact_expected_norm(4096) / expected_norm(4096) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("d", [16, 256, 4096])
def test_norm_concentration_monte_carlo(d):
    g = torch.Generator().manual_seed(d)
    sigma = 0.7
    n = sigma * torch.randn(4000, d, generator=g, dtype=torch.float64)
    norms = n.norm(dim=1)
    # mean: the exact chi mean; spread: about s / sqrt(2) whatever d
    assert norms.mean().item() == pytest.approx(exact_expected_norm(d, sigma), rel=0.01)
    assert norms.std().item() == pytest.approx(sigma / math.sqrt(2), rel=0.08)
    # relative spread shrinks like 1/sqrt(2d)
    rel = (norms / expected_norm(d, sigma)).std().item()
    assert rel == pytest.approx(1 / math.sqrt(2 * d), rel=0.08)


def test_shell_probability_matches_chi_square():
    from scipy.stats import chi2

    for d, eps in [(10, 0.1), (100, 0.05), (1600, 0.02), (50, 0.6)]:
        want = chi2.cdf(d * (1 + 2 * eps), d) - chi2.cdf(d * max(0.0, 1 - 2 * eps), d)
        assert shell_probability(d, eps) == pytest.approx(want, abs=1e-9)
    # the typical set captures almost everything in high dimension
    assert shell_probability(100_000, 0.02) > 0.999


@pytest.mark.parametrize("d,eps", [(16, 0.1), (64, 0.05), (400, 0.05), (1600, 0.02)])
def test_shell_membership_monte_carlo_matches_exact(d, eps):
    g = torch.Generator().manual_seed(d)
    m = 6000
    sigma = torch.full((m,), 0.3)
    n = 0.3 * torch.randn(m, 1, d, generator=g)
    frac = in_typical_set(n, sigma, eps).float().mean().item()
    p = shell_probability(d, eps)
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / m) + 1e-3


def test_shell_radii_agree_with_membership():
    d, sigma, eps = 300, 0.5, 0.05
    lo, hi = typical_shell(d, sigma, eps)
    assert lo == pytest.approx(sigma * math.sqrt(d * 0.9))
    assert hi == pytest.approx(sigma * math.sqrt(d * 1.1))
    radii = torch.tensor([lo * 0.99, lo * 1.001, expected_norm(d, sigma), hi * 0.999, hi * 1.01])
    u = random_directions((5, 3, 10, 10), torch.Generator().manual_seed(0))
    r = u * radii.view(-1, 1, 1, 1)
    assert in_typical_set(r, sigma, eps).tolist() == [False, True, True, True, False]


def test_statistic_is_per_sample_and_by_hand():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 2, 4, 4, generator=g)
    sig = torch.tensor([0.5, 1.0, 2.0])
    stat = typicality_statistic(r, sig)
    by_hand = [(r[i].pow(2).sum() / (32 * sig[i] ** 2) - 1).item() for i in range(3)]
    torch.testing.assert_close(stat, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    # a sample's statistic does not depend on its batch companions
    assert typicality_statistic(r[1:2], 1.0).item() == pytest.approx(stat[1].item(), rel=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="dimension d"):
        expected_norm(0)
    with pytest.raises(ValueError, match="tol"):
        typical_shell(10, 1.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        typicality_statistic(torch.randn(3, 4), torch.ones(2))
    with pytest.raises(ValueError, match="batch dimension"):
        typicality_statistic(torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="outer_range"):
        TypicalSetNoise(outer_range=(1.3, 1.1))
    with pytest.raises(ValueError, match="off_shell_fraction"):
        TypicalSetNoise(off_shell_fraction=1.5)


def test_noise_with_radii_has_those_radii():
    radii = torch.tensor([0.5, 1.0, 1.7])
    n = noise_with_radii(radii, (3, 1, 8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(n.flatten(1).norm(dim=1), radii * 8.0)


TS_CONFIGS = [
    dict(off_shell_fraction=0.5, outer_range=(1.05, 1.3)),
    dict(off_shell_fraction=1.0, outer_range=(1.2, 1.5), inner_range=(0.6, 0.8), inner_fraction=0.5),
    dict(off_shell_fraction=0.25, outer_range=(1.1, 1.1), inner_range=(0.9, 0.9), inner_fraction=1.0),
    dict(off_shell_fraction=0.0),
]


@pytest.mark.parametrize("cfg", TS_CONFIGS)
def test_ts_radii_follow_configuration(cfg):
    ts = TypicalSetNoise(**cfg)
    b, shape = 4000, (4000, 1, 16, 16)
    noise, kind = ts.draw(shape, torch.Generator().manual_seed(3))
    assert noise.shape == shape
    rho = noise.flatten(1).norm(dim=1) / math.sqrt(256)
    off = cfg["off_shell_fraction"]
    inner = cfg.get("inner_fraction", 0.0)
    tol = 4 * math.sqrt(0.25 / b)
    assert (kind != 0).float().mean().item() == pytest.approx(off, abs=tol)
    assert (kind == 2).float().mean().item() == pytest.approx(off * inner, abs=tol)
    for k, rng in ((1, ts.outer_range), (2, ts.inner_range)):
        r = rho[kind == k]
        if len(r):
            assert r.min() >= rng[0] - 1e-5 and r.max() <= rng[1] + 1e-5
            # uniform over the range: the mean sits in the middle
            assert r.mean().item() == pytest.approx(sum(rng) / 2, abs=0.02 * (rng[1] - rng[0]) + 1e-4)
    on = rho[kind == 0]
    if len(on):  # ordinary Gaussian draws: on the shell, spread about 1/sqrt(2d)
        assert on.mean().item() == pytest.approx(1.0, abs=0.01)
        assert on.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.15)


def test_ts_default_moves_samples_outside_the_typical_set():
    ts = NOISE_SAMPLERS.create("typical_set")
    noise, kind = ts.draw((2000, 1, 40, 40), torch.Generator().manual_seed(0))
    inside = in_typical_set(noise, 1.0, tol=0.05)  # radius ratio within about +-0.05
    assert not inside[kind == 1].any()  # every outer sample leaves the eps-typical set
    assert inside[kind == 0].float().mean() > shell_probability(1600, 0.05) - 0.01


@pytest.mark.parametrize("name", NOISE_SAMPLERS.names())
def test_every_noise_sampler_is_repeatable_and_unit_scale(name):
    sampler = NOISE_SAMPLERS.create(name)
    a = sampler((64, 1, 16, 16), torch.Generator().manual_seed(5), "cpu")
    b = sampler((64, 1, 16, 16), torch.Generator().manual_seed(5), "cpu")
    c = sampler((64, 1, 16, 16), torch.Generator().manual_seed(6), "cpu")
    assert a.shape == (64, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.9 < a.std().item() < 1.3
    assert abs(a.mean().item()) < 0.05


def test_dsm_loss_targets_the_ts_noise():
    from ssni.models import create_model

    net = create_model("unet_tiny").eval()
    x = torch.rand(6, 1, 8, 8)
    ts = TypicalSetNoise(off_shell_fraction=1.0, outer_range=(2.0, 2.0))
    loss = DSMLoss(noise=ts)(net, (x, None), torch.Generator().manual_seed(0))
    assert loss.shape == (6,)
    # the freshly built U-Net predicts eps = 0, so the loss is |eps|^2 / d = radius^2 = 4
    torch.testing.assert_close(loss, torch.full((6,), 4.0), rtol=1e-4, atol=1e-4)


def test_train_score_with_ts_recipe(tmp_path):
    from ssni.commands.train_score import ScoreTrainConfig, train_score
    from ssni.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "score" / "digits_ts.yaml"
    cfg = load_config(ScoreTrainConfig, recipe, [
        f"run_dir={tmp_path}", "data.image_size=8", "model.name=unet_tiny", "loop.steps=3",
        "loop.batch_size=8", "loop.progress=false", "loop.sample_every=0", "eval_draws=1",
        "sample_count=4", "sample_steps=4"])
    assert cfg.noise.name == "typical_set"
    out = train_score(cfg)
    assert out["steps"] == 3 and math.isfinite(out["heldout_dsm_after_ema"])
    assert "typical_set" in (tmp_path / "config.yaml").read_text()
