"""Score norm (EPS statistic) and calibration: closed form, batch independence, gradients, files."""
import json
import math

import pytest
import torch

from ssni.diffusion import VPDiffusion
from ssni.models import create_model, save_model
from ssni.models.analytic import GaussianScoreModel
from ssni.scoring import (
    Calibration,
    CalibrationMismatchError,
    ScoreNorm,
    ScoreNormConfig,
    calibrate,
    mean_score,
    score_norm,
    score_times,
)

SHAPE = (1, 8, 8)


def _gauss(mean=0.2, std=0.1):
    return GaussianScoreModel(mean=mean, std=std, shape=SHAPE).double()


def _closed_form(model: GaussianScoreModel, x01: torch.Tensor, timesteps: int, draws: int):
    """Mean vector and per-pixel noise variance of EPS(x) for the exact Gaussian score."""
    d = VPDiffusion()
    t = score_times(timesteps).double().repeat_interleave(draws)
    a, sig = d.mean_coeff(t), d.sigma(t)
    v = a * a * model.std.double().mean() ** 2 + sig * sig  # marginal variance of x_t
    xm = 2 * x01.double() - 1
    c = (a / v).mean()
    mu = -c * (xm - model.mean.double())
    w2 = (sig * sig / (v * v)).sum() / t.numel() ** 2
    return mu, w2


@pytest.mark.parametrize("timesteps,draws", [(20, 1), (5, 3)])
def test_score_norm_matches_gaussian_closed_form(timesteps, draws):
    model = _gauss()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *SHAPE, generator=g, dtype=torch.float64) * 0.3 + 0.45
    x[0] = (model.mean[0, 0, 0].item() + 1) / 2  # exactly at the data mean: noise term only
    n = 3000
    xs = x.repeat_interleave(n, 0)
    seeds = torch.arange(xs.shape[0])
    eps = mean_score(model, xs, timesteps, draws, seeds=seeds, max_batch=4096)
    sq = eps.flatten(1).pow(2).sum(1).reshape(2, n)
    dim = math.prod(SHAPE)
    for k in range(2):
        mu, w2 = _closed_form(model, x[k], timesteps, draws)
        m2 = mu.pow(2).sum()
        expected = m2 + dim * w2  # E||EPS||^2 for EPS ~ N(mu, w2 I)
        sd = torch.sqrt(2 * dim * w2 * w2 + 4 * w2 * m2)  # its exact standard deviation
        assert abs(sq[k].mean() - expected) < 4 * sd / math.sqrt(n)
        assert abs(sq[k].std() / sd - 1) < 0.1
        mean_vec = eps.reshape(2, n, -1)[k].mean(0)
        assert torch.allclose(mean_vec, mu.flatten(), atol=5 * math.sqrt(w2 / n))


def _perturbed_tiny():
    """unet_tiny with its zero-initialised output layers nudged, so its score is not zero."""
    torch.manual_seed(0)
    model = create_model("unet_tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_score_norm_independent_of_batch_and_chunking():
    model = _perturbed_tiny()
    x = torch.rand(5, *SHAPE)
    seeds = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        full = score_norm(model, x, timesteps=6, draws=2, seeds=seeds, max_batch=1000)
        # tiny max_batch splits one sample's rows over several calls
        chunked = score_norm(model, x, timesteps=6, draws=2, seeds=seeds, max_batch=5)
        alone = torch.cat([score_norm(model, x[i:i + 1], timesteps=6, draws=2,
                                      seeds=seeds[i:i + 1]) for i in range(5)])
        other = score_norm(model, torch.cat([x[:1], torch.rand(7, *SHAPE)]), timesteps=6,
                           draws=2, seeds=torch.cat([seeds[:1], torch.arange(7) + 100]))
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other[:1], full[:1], rtol=1e-5, atol=1e-5)
    assert full[1] == full[3] or not torch.equal(x[1], x[3])  # same seed, different images
    assert (full > 0).all() and torch.isfinite(full).all()


def test_score_norm_is_differentiable_and_cheap_without_grad():
    model = _gauss().float()
    x = torch.rand(3, *SHAPE, requires_grad=True)
    s = score_norm(model, x, timesteps=4, seeds=torch.arange(3))
    (gx,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    # checkpointed chunks give the same gradient
    s2 = score_norm(model, x, timesteps=4, seeds=torch.arange(3), max_batch=2, checkpoint=True)
    (gx2,) = torch.autograd.grad(s2.sum(), x)
    torch.testing.assert_close(gx2, gx, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not score_norm(model, x, timesteps=4).requires_grad


@pytest.mark.parametrize("bad,match", [
    (torch.full((2, 1, 8, 8), 2.0), r"\[0, 1\]"),
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    (torch.rand(2, 8, 8), r"\[B,C,H,W\]"),
    (torch.rand(2, 3, 8, 8), "shape"),
])
def test_score_norm_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        score_norm(_gauss().float(), bad, timesteps=2)


def test_score_norm_rejects_bad_settings():
    x = torch.rand(2, *SHAPE)
    with pytest.raises(ValueError, match="timesteps"):
        score_norm(_gauss().float(), x, timesteps=0)
    with pytest.raises(ValueError, match="seeds"):
        score_norm(_gauss().float(), x, timesteps=2, seeds=torch.arange(3))


def test_calibration_roundtrip_quantiles_and_fingerprint(tmp_path):
    model = _gauss().float()
    g = torch.Generator().manual_seed(1)
    images = (0.6 + 0.05 * torch.randn(40, *SHAPE, generator=g)).clamp(0, 1)
    cal, norms = calibrate(model, images, ScoreNormConfig(timesteps=3), batch_size=16)
    assert cal.count == 40 and norms.shape == (40,)
    assert math.isclose(cal.mean, norms.double().mean().item(), rel_tol=1e-6)
    assert math.isclose(cal.quantile(0.5), norms.double().median().item(), rel_tol=0.05)
    assert cal.quantile(0.0) == pytest.approx(norms.min().item(), rel=1e-5)
    assert cal.quantile(1.0) == pytest.approx(norms.max().item(), rel=1e-5)
    assert sum(cal.histogram["counts"]) == 40
    path = cal.save(tmp_path / "calibration.json")
    back = Calibration.load(tmp_path)  # a directory holding calibration.json works too
    assert back == cal and json.loads(path.read_text())["fingerprint"] == cal.fingerprint
    back.check_model(model, ScoreNormConfig(timesteps=3))  # its own network: accepted
    other = _gauss(mean=0.25).float()
    with pytest.raises(CalibrationMismatchError, match="another score network"):
        back.check_model(other)
    with pytest.raises(CalibrationMismatchError, match="timesteps"):
        back.check_model(model, ScoreNormConfig(timesteps=20))
    with pytest.raises(FileNotFoundError, match="ssni calibrate"):
        Calibration.load(tmp_path / "missing.json")


def test_calibrate_cli(tmp_path):
    from ssni.cli import main

    model = _perturbed_tiny()
    save_model(tmp_path / "score", model)
    rc = main(["calibrate", f"output={tmp_path / 'cal'}", f"score_model={tmp_path / 'score'}",
               "data.image_size=8", "count=48", "score_norm.timesteps=3", "progress=false",
               "plot_noise_std=[0.1]"])
    assert rc == 0
    cal = Calibration.load(tmp_path / "cal" / "calibration.json")
    assert cal.count == 48 and cal.data["name"] == "digits" and "gaussian 0.1" in cal.perturbed
    assert (tmp_path / "cal" / "score_norms.png").stat().st_size > 1000
    cal.check_model(model.eval())


def test_score_norm_module_reports_cost():
    sn = ScoreNorm(_gauss().float(), timesteps=7, draws=2)
    assert sn.nfe_per_sample == 14
    out = sn(torch.rand(3, *SHAPE), seeds=torch.arange(3))
    assert out.shape == (3,)
