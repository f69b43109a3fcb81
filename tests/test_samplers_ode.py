"""The `vpode` sampler (probability-flow ODE of the VP SDE, Euler at a fixed dt): registration,
batch independence, a reverse that uses no noise, gradients, and exact maths on Gaussian data,
where both the Euler chain and the exact ODE flow are affine maps known in closed form."""
import math

import pytest
import torch
from torch import nn

import ssni.purify.purifier as purifier_module
from ssni.diffusion import VPDiffusion, to_model_space, to_pixel_space
from ssni.models import EpsModel
from ssni.models.analytic import GaussianScoreModel
from ssni.purify import SAMPLERS, Purifier, PurifierConfig, UnknownOptionError, build_purifier
from ssni.purify.noise import NoiseStream

SHAPE = (1, 4, 4)
MEAN = torch.linspace(-0.3, 0.3, 16).reshape(SHAPE)  # model space
STD = 0.15


class SmallEps(EpsModel):
    """A two-layer conv eps network on 1x8x8, nonlinear in x and t, any dtype."""

    def __init__(self, seed=0):
        super().__init__(VPDiffusion())
        self.in_channels, self.image_size, self.config = 1, 8, {}
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.temb = nn.Linear(3, 8)
        self.conv2 = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        f = torch.stack([torch.sin(3 * t), torch.cos(3 * t), t], 1).to(x.dtype)
        return 0.5 * self.conv2(torch.tanh(self.conv1(x) + self.temb(f)[:, :, None, None]))


def _images(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)).to(dtype)


def _gaussian():
    return GaussianScoreModel(MEAN, STD, SHAPE).double()


def _euler_affine(model, n, dt):
    """The vpode Euler chain on Gaussian data is affine per pixel: x0 = A x_t + c from t = n dt.

    One step: x <- x + dt beta/2 (x + score), score = -(x - sqrt(ab) m) / v, v = ab s^2 + 1 - ab;
    returns (A [C,H,W], c [C,H,W]) in float64.
    """
    d = model.diffusion
    m, s2 = model.mean.double(), model.std.double() ** 2
    a, c = torch.ones_like(m), torch.zeros_like(m)
    for k in range(n, 0, -1):
        t = torch.tensor(k * dt, dtype=torch.float64)
        beta, ab = d.beta(t), d.alpha_bar(t)
        v = ab * s2 + 1 - ab
        # x_new = x (1 + h (1 - 1/v)) + h sqrt(ab) m / v, h = dt beta / 2
        h = 0.5 * dt * beta
        gain = 1 + h * (1 - 1 / v)
        a, c = gain * a, gain * c + h * torch.sqrt(ab) * m / v
    return a, c


def _exact_flow(model, xt, t):
    """The probability-flow ODE's exact map from x_t (model space [B,C,H,W]) at time t to 0:
    x0 = m + (x_t - sqrt(ab) m) s / sqrt(ab s^2 + 1 - ab)."""
    ab = model.diffusion.alpha_bar(torch.tensor(t, dtype=torch.float64))
    m, s = model.mean.double(), model.std.double()
    return m + (xt - torch.sqrt(ab) * m) * s / torch.sqrt(ab * s * s + 1 - ab)


def test_vpode_is_registered_configurable_and_steps_on_the_diffpure_grid():
    assert "vpode" in SAMPLERS.names() and "ddpm_ode" not in SAMPLERS.names()  # not DDIM: see samplers.py
    p = build_purifier(SmallEps(), PurifierConfig(sampler="vpode"))
    assert p.sampler.dt == 1e-3 and not p.sampler.stochastic
    assert p.steps_per_sample(torch.tensor([0.1, 0.02, 0.0])).tolist() == [100, 20, 0]
    assert build_purifier(SmallEps(), PurifierConfig(sampler="vpode", dt=2e-3)).steps_per_sample(0.1).tolist() == [50]
    with pytest.raises(UnknownOptionError, match="sampler 'vpode' has no option 'steps'; its options: dt"):
        build_purifier(SmallEps(), PurifierConfig(sampler="vpode", steps=4))
    with pytest.raises(ValueError, match="dt must be in"):
        Purifier(SmallEps(), "vpode", dt=0.0)


def test_vpode_alone_equals_batched_with_per_sample_seeds():
    m, x = SmallEps().double(), _images(4)
    p = Purifier(m, "vpode", dt=2e-3)
    t = torch.tensor([0.03, 0.1, 0.0, 0.06], dtype=torch.float64)
    seeds = torch.tensor([11, 7, 5, 2024])
    out = p(x, t, seeds=seeds)
    for b in range(4):
        torch.testing.assert_close(p(x[b:b + 1], t[b:b + 1], seeds=seeds[b:b + 1]), out[b:b + 1], rtol=0, atol=1e-12)
    assert torch.equal(out[2], x[2])  # t* = 0: the input itself
    # the forward diffusion is random: other seeds, other outputs
    assert not torch.equal(p(x, t, seeds=seeds + 1)[[0, 1, 3]], out[[0, 1, 3]])


class _JunkAfterFirstDraw(NoiseStream):
    """A NoiseStream whose draws after each sample's first (the forward diffusion's) come from an
    unrelated generator: a sampler whose reverse reads noise gives another output under it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._junk = torch.Generator().manual_seed(12345)

    def draw(self, rows=None):
        first = self.draws() if rows is None else self.draws()[rows]
        out = super().draw(rows)
        later = torch.as_tensor(first > 0)
        junk = torch.randn(out.shape, generator=self._junk, dtype=out.dtype)
        return torch.where(later.view(-1, *([1] * (out.dim() - 1))), junk, out)


@pytest.mark.parametrize("name", ["vpode", "diffpure"])
def test_reverse_is_deterministic_given_the_forward_noise(monkeypatch, name):
    """Same forward diffusion (same first draw), different noise for every later draw: vpode's
    output does not move; diffpure's does (the control that shows the test can fail)."""
    m, x = SmallEps().double(), _images(3)
    t, seeds = torch.tensor([0.05, 0.02, 0.08], dtype=torch.float64), torch.tensor([1, 2, 3])
    p = Purifier(m, name, dt=2e-3)
    ref = p(x, t, seeds=seeds)
    monkeypatch.setattr(purifier_module, "NoiseStream", _JunkAfterFirstDraw)
    other = p(x, t, seeds=seeds)
    if name == "vpode":
        assert torch.equal(other, ref)
    else:
        assert (other - ref).abs().max() > 1e-3


def test_vpode_output_is_the_euler_ode_from_the_diffused_image():
    """The purifier's output equals a hand-written Euler loop of the ODE started from its own
    forward diffusion (the output depends on the seeds only through x_t*)."""
    m, x = SmallEps().double(), _images(2)
    dt, n = 2e-3, 25
    p = Purifier(m, "vpode", dt=dt)
    seeds = torch.tensor([4, 9])
    xt = p.diffuse(x, n * dt, seeds=seeds)
    d = m.diffusion
    with torch.no_grad():
        for k in range(n, 0, -1):
            t = torch.full((2,), k * dt, dtype=torch.float64)
            beta = d.beta(t).view(-1, 1, 1, 1)
            score = -m(xt, t) / d.sigma(t).view(-1, 1, 1, 1)
            xt = xt + dt * (0.5 * beta * xt + 0.5 * beta * score)  # x(t - dt) = x(t) - dt * drift
        torch.testing.assert_close(p(x, n * dt, seeds=seeds), to_pixel_space(xt).clamp(0, 1), rtol=0, atol=1e-12)


def test_vpode_full_gradients_flow_and_equal_the_exact_jacobian():
    """Gaussian data: out = (A (a (2x - 1) + s z) + c + 1) / 2, so d out / d x = A a per pixel."""
    model = _gaussian()
    dt, n = 2e-3, 40
    p = Purifier(model, "vpode", dt=dt)
    x = to_pixel_space(model.sample(3, torch.Generator().manual_seed(2)).double()).requires_grad_(True)
    out = p(x, n * dt, seeds=torch.tensor([1, 2, 3]))
    assert out.requires_grad and 0 < out.min() and out.max() < 1  # no clamp is active
    out.sum().backward()
    a_chain, _ = _euler_affine(model, n, dt)
    a_start = math.exp(0.5 * model.diffusion.log_alpha_bar(torch.tensor(n * dt, dtype=torch.float64)).item())
    torch.testing.assert_close(x.grad, (a_chain * a_start).expand_as(x), rtol=1e-10, atol=0)
    # and a nonlinear network: finite, nonzero gradients through every checkpointed step
    xs = _images(2, torch.float32).requires_grad_(True)
    Purifier(SmallEps(), "vpode")(xs, 0.05, seeds=torch.tensor([1, 2])).square().sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().min() > 0


def test_vpode_equals_its_exact_euler_chain_and_converges_to_the_exact_flow():
    """Per sample: the output is the affine Euler chain of x_t* exactly (float64), and the
    chain's distance to the exact ODE flow halves when dt halves (first-order Euler)."""
    model = _gaussian()
    x = to_pixel_space(model.sample(8, torch.Generator().manual_seed(3)).double())
    seeds = torch.arange(8)
    t_star = 0.5
    errors = []
    for dt in (4e-3, 2e-3, 1e-3):
        p = Purifier(model, "vpode", dt=dt)
        n = round(t_star / dt)
        xt = p.diffuse(x, t_star, seeds=seeds)
        out = to_model_space(p(x, t_star, seeds=seeds))
        a, c = _euler_affine(model, n, dt)
        torch.testing.assert_close(out, a * xt + c, rtol=0, atol=1e-12)
        errors.append((out - _exact_flow(model, xt, t_star)).abs().max().item())
    assert errors[-1] < 2e-3, errors
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 1.7 < coarse / fine < 2.3, errors


def test_vpode_maps_the_diffused_data_distribution_back_to_the_data():
    """Gaussian data N(m, s^2) diffused to t* = 0.5 and brought back by the ODE at dt = 1e-3:
    per-pixel mean and variance match the data's within Monte Carlo error plus the Euler chain's
    exact biases (mean: |A sqrt(ab) m + c - m|, about 1e-4; variance: |A^2 v / s^2 - 1|, about 1%)."""
    model = _gaussian()
    n_samples, t_star, dt = 4000, 0.5, 1e-3
    x0 = to_pixel_space(model.sample(n_samples, torch.Generator().manual_seed(0)).double())
    assert 0 < x0.min() and x0.max() < 1
    with torch.no_grad():
        out = to_model_space(Purifier(model, "vpode", dt=dt)(x0, t_star, seeds=torch.arange(n_samples)))
    a, c = _euler_affine(model, round(t_star / dt), dt)
    ab = model.diffusion.alpha_bar(torch.tensor(t_star, dtype=torch.float64))
    v = ab * STD ** 2 + 1 - ab
    bias = (a * a * v / STD ** 2 - 1).abs().max().item()
    mean_bias = (a * torch.sqrt(ab) * MEAN.double() + c - MEAN.double()).abs().max().item()
    assert bias < 0.015 and mean_bias < 1e-3, (bias, mean_bias)
    mu, var = out.mean(0), out.var(0)
    mean_se = STD / math.sqrt(n_samples)
    assert (mu - MEAN.double()).abs().max() < 4.5 * mean_se + mean_bias
    rel = var / STD ** 2 - 1
    assert abs(rel.mean().item()) < 4.0 * math.sqrt(2.0 / (n_samples * 16)) + bias, rel.mean().item()
    assert rel.abs().max().item() < 4.5 * math.sqrt(2.0 / n_samples) + bias, rel.abs().max().item()
