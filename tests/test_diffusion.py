import math

import pytest
import torch

from ssni.diffusion import VPDiffusion


def test_alpha_bar_decreasing_and_vp_identity():
    d = VPDiffusion()
    t = torch.linspace(0, 1, 501)
    ab = d.alpha_bar(t)
    assert torch.all(ab[1:] < ab[:-1])
    assert ab[0].item() == pytest.approx(1.0)
    torch.testing.assert_close(d.mean_coeff(t) ** 2 + d.sigma(t) ** 2, torch.ones_like(t))
    assert torch.all(d.discrete_alpha_bar[1:] < d.discrete_alpha_bar[:-1])


def test_discrete_betas_match_ddpm_schedule():
    d = VPDiffusion()
    assert d.discrete_betas[0].item() == pytest.approx(1e-4)
    assert d.discrete_betas[-1].item() == pytest.approx(0.02)
    assert len(d.discrete_betas) == 1000


def test_discrete_and_continuous_agree_at_matching_t():
    d = VPDiffusion()
    i = torch.arange(0, 1000)
    t = d.t_of_step(i)
    cont = d.alpha_bar(t).double()
    disc = d.discrete_alpha_bar
    # agreement in log space within O(1/N) relative error, and step<->t round trip
    gap = (torch.log(disc) - torch.log(cont)).abs()
    # first order in 1/N: the gap is at most (beta_max / N) * t plus 1% of |log alpha_bar|
    assert torch.all(gap <= (d.beta_max / d.N) * t.double() + 0.01 * torch.log(cont).abs())
    # sigma (what the score depends on) agrees to 1e-2 absolute everywhere
    assert (torch.sqrt(1 - disc) - torch.sqrt(1 - cont)).abs().max().item() < 1e-2
    assert torch.equal(d.step_of_t(t), i)


def test_q_sample_statistics_per_sample():
    d = VPDiffusion()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.02, 0.1, 0.5, 1.0])
    x0 = torch.tensor([0.8, -0.3, 0.5, 0.1]).view(4, 1, 1, 1).expand(4, 1, 100, 100)
    xt = d.q_sample(x0, t, generator=g)
    mean = xt.flatten(1).mean(1)
    var = xt.flatten(1).var(1)
    n = 10000
    exp_mean = d.mean_coeff(t) * x0[:, 0, 0, 0]
    exp_var = d.sigma(t) ** 2
    assert torch.all((mean - exp_mean).abs() < 5 * torch.sqrt(exp_var / n))
    assert torch.all((var / exp_var - 1).abs() < 5 * math.sqrt(2 / n))


def test_eps_score_roundtrip_and_t_validation():
    d = VPDiffusion()
    eps = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(d.score_to_eps(d.eps_to_score(eps, t), t), eps)
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        d.check_t(torch.tensor([0.1, 1.5, 0.2]), 3)
    with pytest.raises(ValueError, match="NaN"):
        d.check_t(torch.tensor([0.1, float("nan"), 0.2]), 3)
    assert d.check_t(0.3, 5).shape == (5,)
