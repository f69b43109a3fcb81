"""Typical-set utilities and the TS noise sampler: concentration, shell membership, radii."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssni.noise import NOISE_SAMPLERS
from ssni.training import DSMLoss
from ssni.typical import (
    DIRECTIONS,
    TypicalSetNoise,
    exact_expected_norm,
    expected_norm,
    in_typical_set,
    lowfreq_directions,
    noise_with_radii,
    random_directions,
    shell_probability,
    sign_directions,
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
    with pytest.raises(ValueError, match="isotropic, sign, lowfreq") as err:
        TypicalSetNoise(direction="radial")
    assert "'radial'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sign_block"):
        TypicalSetNoise(direction="sign", sign_block=0)
    with pytest.raises(ValueError, match="lowfreq_factor"):
        TypicalSetNoise(direction="lowfreq", lowfreq_factor=1.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        TypicalSetNoise(direction="lowfreq").draw((4, 64))


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
    inside = in_typical_set(noise, 1.0, tol=0.019)  # radius ratio within about +-0.019 (one spread)
    assert not inside[kind == 1].any()  # every outer sample (ratio >= 1.02) leaves the eps-typical set
    assert inside[kind == 0].float().mean() > shell_probability(1600, 0.019) - 0.03


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


# ---- off-shell directions -------------------------------------------------------------------

def _old_draw(ts, shape, generator):
    """The draw of TypicalSetNoise before directions existed, kept verbatim as the reference."""
    b, d = shape[0], math.prod(shape[1:])
    g = torch.randn(shape, generator=generator)
    u = torch.rand(b, 3, generator=generator)
    off = u[:, 0] < ts.off_shell_fraction
    inside = off & (u[:, 1] < ts.inner_fraction)
    outside = off & ~inside
    lo = torch.where(inside, ts.inner_range[0], ts.outer_range[0]).to(g)
    hi = torch.where(inside, ts.inner_range[1], ts.outer_range[1]).to(g)
    target = (lo + (hi - lo) * u[:, 2]) * math.sqrt(d)
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = torch.where(off, target / norm, torch.ones_like(norm))
    return g * scale.view(-1, 1, 1, 1), outside.long() + 2 * inside.long()


@pytest.mark.parametrize("cfg", TS_CONFIGS)
def test_default_direction_is_bit_identical_to_before(cfg):
    for ts in (TypicalSetNoise(**cfg), TypicalSetNoise(**cfg, direction="isotropic")):
        new, kind = ts.draw((64, 1, 8, 8), torch.Generator().manual_seed(11))
        old, old_kind = _old_draw(ts, (64, 1, 8, 8), torch.Generator().manual_seed(11))
        assert torch.equal(new, old) and torch.equal(kind, old_kind)


def test_default_direction_matches_recorded_values():
    # recorded with the sampler as it was before directions were added (torch 2.x CPU generator)
    ts = TypicalSetNoise(off_shell_fraction=0.5, outer_range=(1.05, 1.3), inner_fraction=0.5)
    n, kind = ts.draw((6, 1, 5, 5), torch.Generator().manual_seed(123))
    assert kind.tolist() == [0, 0, 1, 2, 0, 0]
    torch.testing.assert_close(n.flatten(1).norm(dim=1), torch.tensor(
        [4.217070579528809, 5.655567169189453, 5.449268817901611, 4.07472562789917,
         4.514264106750488, 5.525111675262451]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n[:, 0, 0, 0], torch.tensor(
        [0.3373701870441437, -1.5723042488098145, -1.498691439628601, -0.05888461321592331,
         -0.031861238181591034, 1.277376651763916]), rtol=1e-6, atol=1e-6)


DIRECTION_CASES = [dict(direction="isotropic"), dict(direction="sign"), dict(direction="sign", sign_block=2),
                   dict(direction="lowfreq"), dict(direction="lowfreq", lowfreq_factor=2)]


@pytest.mark.parametrize("dcfg", DIRECTION_CASES)
@pytest.mark.parametrize("cfg", TS_CONFIGS[:3])
def test_off_shell_radii_and_fraction_for_every_direction(cfg, dcfg):
    ts = TypicalSetNoise(**cfg, **dcfg)
    b, shape = 3000, (3000, 1, 12, 12)
    noise, kind = ts.draw(shape, torch.Generator().manual_seed(7))
    assert noise.shape == shape and torch.isfinite(noise).all()
    rho = noise.flatten(1).norm(dim=1).double() / 12.0
    off = cfg["off_shell_fraction"]
    inner = cfg.get("inner_fraction", 0.0)
    tol = 4 * math.sqrt(0.25 / b)  # binomial: 4 standard deviations at worst (p = 1/2)
    assert (kind != 0).float().mean().item() == pytest.approx(off, abs=tol)
    assert (kind == 2).float().mean().item() == pytest.approx(off * inner, abs=tol)
    assert inner > 0 or not (kind == 2).any()
    for k, (lo, hi) in ((1, ts.outer_range), (2, ts.inner_range)):
        r = rho[kind == k]
        if len(r):
            assert r.min() >= lo - 1e-5 and r.max() <= hi + 1e-5
    # on-shell draws stay Gaussian whatever the direction: the isotropic sampler's very draws
    iso, iso_kind = TypicalSetNoise(**cfg).draw(shape, torch.Generator().manual_seed(7))
    assert torch.equal(kind, iso_kind) and torch.equal(noise[kind == 0], iso[kind == 0])


@pytest.mark.parametrize("block", [1, 2, 5])
def test_sign_directions_have_equal_magnitudes(block):
    g = torch.Generator().manual_seed(0)
    u = sign_directions((50, 2, 10, 10), block, g)
    mag = u.abs().flatten(1)
    assert torch.allclose(mag, torch.full_like(mag, 1 / math.sqrt(200)))
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(50))
    if block > 1:  # constant over each block x block square
        blocks = u.reshape(50, 2, 10 // block, block, 10 // block, block)
        assert (blocks == blocks[:, :, :, :1, :, :1]).all()
    # after scaling, each off-shell sample's entries all share one magnitude: radius * sigma
    ts = TypicalSetNoise(off_shell_fraction=1.0, outer_range=(1.1, 1.4), direction="sign", sign_block=block)
    n, kind = ts.draw((50, 2, 10, 10), g)
    a = n.abs().flatten(1)
    assert (kind == 1).all()
    torch.testing.assert_close(a, a[:, :1].expand_as(a))
    torch.testing.assert_close(a[:, 0], n.flatten(1).norm(dim=1) / math.sqrt(200))
    # the signs are balanced (4 standard deviations of the independent signs) and vary across samples
    indep = 50 * 2 * math.ceil(10 / block) ** 2
    assert abs(torch.sign(n).mean().item()) < 4 / math.sqrt(indep) and not torch.equal(torch.sign(n[0]), torch.sign(n[1]))


def _low_energy_share(u):
    """Share of each sample's energy kept by a 2x2 average-pool + upsample reconstruction; [B]."""
    rec = F.interpolate(F.avg_pool2d(u, 2), scale_factor=2, mode="nearest")
    return rec.pow(2).flatten(1).sum(1) / u.pow(2).flatten(1).sum(1)


def test_lowfreq_directions_are_smooth():
    g = torch.Generator().manual_seed(0)
    u = lowfreq_directions((300, 1, 16, 16), 4, g)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(300))
    low, iso = _low_energy_share(u), _low_energy_share(random_directions((300, 1, 16, 16), g))
    # white noise keeps about 1/4 of its energy in the 2x2 means; the smooth directions nearly all
    assert iso.mean().item() == pytest.approx(0.25, abs=0.03)
    assert low.mean() > 0.9 and low.min() > 0.8
    # the same holds for the off-shell draws of the sampler, and not for its on-shell ones
    ts = TypicalSetNoise(off_shell_fraction=0.5, direction="lowfreq")
    n, kind = ts.draw((400, 1, 16, 16), g)
    share = _low_energy_share(n)
    assert share[kind == 1].min() > 0.8 and share[kind == 0].max() < 0.45
    # odd sizes are cut back to the image: ceil(13 / 4) = 4 coarse pixels per side
    assert lowfreq_directions((2, 3, 13, 7), 4, g).shape == (2, 3, 13, 7)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_direction_is_repeatable_and_registered(direction):
    ts = NOISE_SAMPLERS.create("typical_set", direction=direction)
    a = ts((32, 1, 8, 8), torch.Generator().manual_seed(2), "cpu")
    b = ts((32, 1, 8, 8), torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(a, b) and direction in repr(ts)
