"""Purifier behaviour on tiny networks: identity at t* = 0, batch independence, cost, gradients,
bad input. Every test that can loops over the registered samplers."""
import numpy as np
import pytest
import torch
from torch import nn

from ssni.config import ConfigError, load_config
from ssni.diffusion import VPDiffusion
from ssni.models import EpsModel, create_model
from ssni.purify import GRAD_MODES, SAMPLERS, Purifier, PurifierConfig, build_purifier

SAMPLER_NAMES = SAMPLERS.names()


class SmallEps(EpsModel):
    """A two-layer conv eps network on 1x8x8 that runs in any dtype (fast, nonlinear in x and t)."""

    def __init__(self, seed=0):
        super().__init__(VPDiffusion())
        self.in_channels, self.image_size, self.config = 1, 8, {}
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.temb = nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        f = torch.stack([torch.sin(3 * t), torch.cos(3 * t), t, t * t], 1).to(x.dtype)
        h = torch.nn.functional.silu(self.conv1(x) + self.temb(f)[:, :, None, None])
        return 0.5 * self.conv2(h)



def _opts(name, steps=None, dt=None):
    """The given options that sampler `name` takes (diffpure: dt; the others: steps)."""
    from ssni.purify import sampler_option_names

    own = sampler_option_names(name)
    return {k: v for k, v in (("steps", steps), ("dt", dt)) if v is not None and k in own}

def _tiny(dtype=torch.float32, seed=0):
    """A small eps network (SmallEps) in the given dtype."""
    return SmallEps(seed).eval().to(dtype)


def _unet_tiny(seed=0):
    """unet_tiny with its zero-initialised output layer perturbed, so eps depends on x and t."""
    torch.manual_seed(seed)
    m = create_model("unet_tiny").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _images(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)).to(dtype)


class CountingModel(nn.Module):
    """Wraps an EpsModel and records the batch size of every network call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.diffusion = inner.diffusion
        self.input_shape = inner.input_shape
        self.sizes = []

    def forward(self, x, t):
        self.sizes.append(x.shape[0])
        return self.inner(x, t)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_t_star_zero_returns_input_unchanged(name):
    m, x = _tiny(), _images(3)
    p = Purifier(m, name, **_opts(name, steps=5))
    out = p(x, 0.0, seeds=torch.arange(3))
    assert torch.equal(out, x) and p.nfe_last == 0
    # mixed batch: the t* = 0 sample is untouched, the others are purified
    out = p(x, torch.tensor([0.0, 0.05, 0.1]), seeds=torch.arange(3))
    assert torch.equal(out[0], x[0])
    assert not torch.equal(out[1:], x[1:])
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_batched_equals_one_by_one(name):
    m, x = _tiny(torch.float64), _images(4, torch.float64)
    p = Purifier(m, name, **_opts(name, steps=8, dt=2e-3))
    t = torch.tensor([0.03, 0.1, 0.0, 0.06], dtype=torch.float64)
    seeds = torch.tensor([11, 7, 5, 2024])
    out = p(x, t, seeds=seeds)
    for b in range(4):
        alone = p(x[b:b + 1], t[b:b + 1], seeds=seeds[b:b + 1])
        torch.testing.assert_close(alone, out[b:b + 1], rtol=0, atol=1e-12)
    # the same seeds repeat bit for bit; other seeds give another draw (except ddim's... also
    # random: its forward diffusion draws noise)
    assert torch.equal(p(x, t, seeds=seeds), out)
    assert not torch.equal(p(x, t, seeds=seeds + 1)[[0, 1, 3]], out[[0, 1, 3]])


def test_float32_batched_matches_alone_within_rounding():
    m, x = _unet_tiny(), _images(3)
    p = Purifier(m, "diffpure", dt=5e-3)
    t, seeds = torch.tensor([0.02, 0.05, 0.04]), torch.tensor([3, 4, 5])
    out = p(x, t, seeds=seeds)
    for b in range(3):
        torch.testing.assert_close(p(x[b:b + 1], t[b:b + 1], seeds=seeds[b:b + 1]),
                                   out[b:b + 1], rtol=0, atol=1e-5)


def test_generator_and_global_rng_make_runs_repeatable():
    m, x = _tiny(), _images(2)
    p = Purifier(m, "ddpm", steps=5)
    a = p(x, 0.05, generator=torch.Generator().manual_seed(3))
    b = p(x, 0.05, generator=torch.Generator().manual_seed(3))
    c = p(x, 0.05, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = p(x, 0.05)
    torch.manual_seed(9)
    assert torch.equal(d, p(x, 0.05))


def test_diffpure_step_count_follows_each_t_star_and_runs_active_samples_only():
    cm = CountingModel(_tiny())
    p = Purifier(cm, "diffpure")  # dt = 1e-3: t* = 0.1 is 100 steps
    out = p(_images(3), torch.tensor([0.02, 0.1, 0.05]), seeds=torch.arange(3))
    assert out.shape == (3, 1, 8, 8)
    assert p.nfe_last == 20 + 100 + 50 and p.calls_last == 100
    assert p.steps_per_sample(torch.tensor([0.02, 0.1, 0.05])).tolist() == [20, 100, 50]
    assert len(cm.sizes) == 100 and sum(cm.sizes) == 170
    assert cm.sizes[:50] == [1] * 50 and cm.sizes[50:80] == [2] * 30 and cm.sizes[80:] == [3] * 20


def test_ddpm_full_grid_is_fixed_step_size_and_strided_grid_follows_ssni():
    cm = CountingModel(_tiny())
    p = Purifier(cm, "ddpm")  # steps=None: every discrete step
    p(_images(2), torch.tensor([0.03, 0.01]), seeds=torch.arange(2))
    assert p.nfe_last == 40 and sum(cm.sizes) == 40 and max(cm.sizes) == 2
    d = cm.diffusion
    plan = SAMPLERS.get("ddpm")(steps=10).plan(d, torch.tensor([0.1, 0.005], dtype=torch.float64))
    big = (np.ceil(np.linspace(0, 100, 11)) - 1).astype(int)[::-1]
    assert plan.grid[0].tolist() == big.tolist()
    assert plan.lengths.tolist() == [10, 5]  # 5 discrete steps < 10: every step, no repeats
    assert plan.grid[1, -6:].tolist() == [4, 3, 2, 1, 0, -1]


def test_gns_runs_each_stage_and_one_stage_equals_inner_sampler():
    m, x = _tiny(), _images(2)
    seeds, t = torch.tensor([1, 2]), torch.tensor([0.04, 0.08])
    one = Purifier(m, "gns", stages=[1.0], inner="ddpm", steps=6)
    ddpm = Purifier(m, "ddpm", steps=6)
    assert torch.equal(one(x, t, seeds=seeds), ddpm(x, t, seeds=seeds))
    multi = Purifier(m, "gns", stages=[0.5, 1.0], inner="diffpure")
    multi(x, t, seeds=seeds)
    assert multi.nfe_last == (20 + 40) + (40 + 80)


def test_gdmp_guidance_pulls_towards_the_input():
    m, x = _tiny(), _images(4)
    seeds, t = torch.arange(4), 0.2
    free = Purifier(m, "gdmp", guidance_scale=0.0, steps=20)(x, t, seeds=seeds)
    assert torch.equal(free, Purifier(m, "ddpm", steps=20)(x, t, seeds=seeds))
    guided = Purifier(m, "gdmp", guidance_scale=20.0, steps=20)(x, t, seeds=seeds)
    assert (guided - x).square().mean() < 0.5 * (free - x).square().mean()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_checkpointed_gradients_equal_plain_autograd(name):
    m, x0 = _tiny(), _images(3)
    t, seeds = torch.tensor([0.02, 0.05, 0.0]), torch.tensor([5, 6, 7])
    w = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for ckpt in (False, True):
        cm = CountingModel(m)
        p = Purifier(cm, name, checkpoint=ckpt, **_opts(name, steps=6))
        x = x0.clone().requires_grad_(True)
        m.zero_grad()
        out = p(x, t, seeds=seeds)
        calls = len(cm.sizes)
        (out * w).sum().backward()
        # with checkpointing every step's network call is recomputed in the backward pass
        assert len(cm.sizes) == (2 * calls if ckpt else calls)
        grads[ckpt] = (x.grad.clone(), m.conv2.weight.grad.clone())
    assert grads[False][0].abs().sum() > 0
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-5, atol=1e-7)
    assert torch.equal(grads[True][0][2], w[2])  # t* = 0: identity


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_gradients_match_finite_differences(name):
    m, x = _tiny(torch.float64), _images(2, torch.float64)
    p = Purifier(m, name, **_opts(name, steps=8, dt=4e-3))
    t, seeds = torch.tensor([0.03, 0.06], dtype=torch.float64), torch.tensor([1, 2])
    w = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(inp):
        return (p(inp, t, seeds=seeds) * w).sum()

    xg = x.clone().requires_grad_(True)
    f(xg).backward()
    g = torch.Generator().manual_seed(2)
    h = 1e-6
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert (xg.grad * v).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_bpda_is_identity_backward_with_the_purified_value():
    m, x0 = _tiny(), _images(2)
    p = Purifier(m, "ddpm", steps=5)
    seeds, w = torch.tensor([1, 2]), torch.randn(2, 1, 8, 8)
    full = p(x0, 0.05, seeds=seeds)
    x = x0.clone().requires_grad_(True)
    out = p(x, 0.05, seeds=seeds, grad="bpda")
    assert torch.equal(out, full)
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_purifier_never_switches_gradients_off_by_itself():
    m, x = _tiny(), _images(2).requires_grad_(True)
    req = [q.requires_grad for q in m.parameters()]
    p = Purifier(m, "diffpure")
    assert p(x, 0.01).requires_grad
    with torch.no_grad():
        assert not p(x, 0.01).requires_grad  # the caller decides
    assert [q.requires_grad for q in m.parameters()] == req
    p.train()
    assert p.training and not m.training  # the score net stays in eval: dropout is unseeded


def test_forward_diffusion_matches_alpha_bar_per_sample():
    m = _tiny()
    t = torch.tensor([0.0, 0.02, 0.1, 0.3, 0.7, 1.0])
    reps = 400
    x0 = torch.full((len(t) * reps, 1, 8, 8), 0.8)  # model space 0.6
    tt = t.repeat_interleave(reps)
    d = m.diffusion
    for name in SAMPLER_NAMES:
        p = Purifier(m, name)
        xt = p.diffuse(x0, tt, seeds=torch.arange(len(tt))).reshape(len(t), -1)
        t1 = t * p.sampler.stage_scales[0] if name == "gns" else t  # gns: its first stage
        if name in ("diffpure", "vpode"):  # the fixed-dt samplers: continuous VP time
            ab = d.alpha_bar(torch.round(t1.double() / 1e-3) * 1e-3)
        else:
            i = torch.round(t1.double() * d.N).long() - 1
            ab = torch.where(i < 0, torch.ones(len(t), dtype=torch.float64),
                             d.discrete_alpha_bar[i.clamp(min=0)])
        torch.testing.assert_close(p.alpha_bar_start(t, len(t)), ab)
        n = xt.shape[1]
        mean_se = torch.sqrt((1 - ab) / n)
        assert ((xt.double().mean(1) - ab.sqrt() * 0.6).abs() <= 4.5 * mean_se + 1e-6).all()
        var = xt.double().var(1)
        var_se = (1 - ab) * (2.0 / n) ** 0.5
        assert ((var - (1 - ab)).abs() <= 4.5 * var_se + 1e-9).all()


def test_bad_input_names_samples_and_expected_values():
    m, x = _tiny(), _images(3)
    p = Purifier(m, "ddpm", steps=3)
    with pytest.raises(ValueError, match=r"samples \[1\].*\[0, 1\]"):
        p(x, torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(ValueError, match=r"samples \[2\]"):
        p(x, torch.tensor([0.1, 0.2, float("nan")]))
    bad = x.clone()
    bad[2, 0, 0, 0] = 1.2
    with pytest.raises(ValueError, match=r"outside \[0, 1\] in samples \[2\]"):
        p(bad, 0.1)
    bad = x.clone()
    bad[0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/Inf in samples \[0\]"):
        p(bad, 0.1)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*channels 1"):
        p(torch.rand(2, 3, 8, 8), 0.1)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        p(torch.rand(2, 1, 16, 16), 0.1)
    with pytest.raises(ValueError, match=r"seeds must be .* shape \[3\]"):
        p(x, 0.1, seeds=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must be a number or a tensor of shape"):
        p(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(KeyError, match="ddpm"):
        Purifier(m, "no_such_sampler")
    with pytest.raises(KeyError, match="bpda"):
        p(x, 0.1, grad="nope")
    with pytest.raises(ValueError, match="steps"):
        Purifier(m, "ddim", steps=0)


def test_config_from_yaml_and_registries_complete(tmp_path):
    assert set(SAMPLER_NAMES) >= {"diffpure", "vpode", "ddpm", "ddim", "gns", "gdmp"}
    assert set(GRAD_MODES.names()) == {"full", "bpda"}
    recipe = tmp_path / "p.yaml"
    recipe.write_text("sampler: ddim\nsteps: 4\n")
    cfg = load_config(PurifierConfig, recipe, ["grad=bpda"])
    p = build_purifier(_tiny(), cfg)
    assert p.sampler.steps == 4 and p.grad == "bpda"
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(PurifierConfig, recipe, ["stepz=2"])


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_an_option_the_sampler_does_not_take_is_an_error_listing_its_options(name):
    from ssni.purify import UnknownOptionError, sampler_option_names

    own = sampler_option_names(name)
    foreign = "dt" if "dt" not in own else "steps"
    with pytest.raises(UnknownOptionError, match=rf"sampler '{name}' has no option '{foreign}'; its options: "
                       + ", ".join(own)):
        build_purifier(_tiny(), PurifierConfig(sampler=name, **{foreign: 3}))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_t_star_gradient_passes_straight_through_the_diffusion_level(name):
    m, x = _tiny(), _images(3)
    seeds = torch.tensor([1, 2, 3])
    p = Purifier(m, name, **_opts(name, steps=5, dt=5e-3))
    t0 = torch.tensor([0.0, 0.04, 0.1])
    plain = p(x, t0, seeds=seeds)
    t = t0.clone().requires_grad_(True)
    out = p(x, t, seeds=seeds)
    assert torch.equal(out.detach(), plain)  # the value does not change
    out.sum().backward()
    assert torch.isfinite(t.grad).all()
    assert t.grad[0] == 0 and (t.grad[1:] != 0).all()  # t* = 0 returns the input: no slope
