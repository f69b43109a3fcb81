"""The per-step ("full_intermediate") loss: Purifier.trajectory, RobustClassifier.run_steps and the
views' stepwise logits, the per_step_gradient oracle, and the per_step attack wrapper with EOT."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssni.attacks import EOT, PGD, EOTGradient, per_step, per_step_gradient, plain_gradient
from ssni.attacks.base import ce_loss
from ssni.defense import RobustClassifier, fixed_view
from ssni.models.analytic import GaussianScoreModel
from ssni.purify import PurifierConfig, build_purifier
from ssni.purify.noise import NoiseStream
from ssni.scoring import ScoreNormConfig, build_reweight
from ssni.seeding import mix_seeds

SHAPE = (1, 8, 8)
SN = ScoreNormConfig(timesteps=4)
DT = 5e-3  # diffpure / vpode step: t* of a few hundredths is a few steps


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.55 + 0.15 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)


def _defense(purifier=None, attack_purifier=None, ensemble=1, per_sample_t=True):
    """A Gaussian score model, a two-layer classifier and a sigmoid reweight whose t* differs per
    sample (0 to about 0.04, so 0 to 8 steps of DT)."""
    sm = GaussianScoreModel(mean=0.1, std=0.4, shape=SHAPE)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    pur = build_purifier(sm, PurifierConfig(**(purifier or {"sampler": "diffpure", "dt": DT})))
    att = build_purifier(sm, PurifierConfig(**attack_purifier)) if attack_purifier else None
    probe = RobustClassifier(classifier=clf, score_model=sm, purifier=pur, reweight=build_reweight("constant"),
                             score_norm=SN, input_size=8)
    _, s = probe.noise_levels(_images(), seeds=torch.arange(6))
    reweight = (build_reweight("sigmoid", t_base=0.04, b=0.0, mu=s.median().item(), tau=s.std().item())
                if per_sample_t else build_reweight("constant", t_base=0.03))
    return RobustClassifier(classifier=clf, score_model=sm, purifier=pur, reweight=reweight, score_norm=SN,
                            input_size=8, attack_purifier=att, ensemble=ensemble)


class Seeded(nn.Module):
    """A view called with fixed seeds (what an oracle's model(x) / model.stepwise(x) sees)."""

    def __init__(self, view, seeds):
        super().__init__()
        self.view, self.seeds = view, seeds

    def forward(self, x):
        return self.view(x, self.seeds)

    def stepwise(self, x):
        return self.view.stepwise(x, self.seeds)


@pytest.mark.parametrize("sampler", [{"sampler": "diffpure", "dt": DT}, {"sampler": "vpode", "dt": DT},
                                     {"sampler": "ddpm", "steps": 3}, {"sampler": "gns", "stages": [0.5, 1.0],
                                                                       "inner": "ddim", "steps": 2}])
def test_last_step_is_the_views_output_with_the_same_seeds(sampler):
    d = _defense(purifier=sampler)
    x, seeds = _images(), torch.arange(6) + 10
    for view in (d.view("full"), d.view("adaptive"), d.view("bpda"), d.view("bare"), fixed_view(d), d):
        steps = view.stepwise(x, seeds)
        assert steps.dim() == 3 and steps.shape[1:] == (6, 3)
        assert torch.equal(steps[-1], view(x, seeds)), type(view).__name__
    # S: one entry per global reverse step (all stages), the t* per sample differing
    t = d.last_t_star
    assert len(set(t.tolist())) > 2
    n_steps = d.stepwise(x, seeds).shape[0]
    assert n_steps == d.purifier.calls_last and n_steps > 1
    assert d.view("bare").stepwise(x).shape[0] == 1


def test_ensemble_votes_every_step_and_attack_purifier_is_used():
    d = _defense(ensemble=2, attack_purifier={"sampler": "ddpm", "steps": 2})
    x, seeds = _images(), torch.arange(6)
    full = d.view("full")
    steps = full.stepwise(x, seeds)
    assert steps.shape[0] == 2  # the surrogate ddpm(steps=2), not the defense's diffpure
    assert torch.equal(steps[-1], full(x, seeds))
    own = d.stepwise(x, seeds)
    assert own.shape[0] > 2 and torch.equal(own[-1], d(x, seeds))


def _hand_steps(d, x, seeds):
    """The stated meaning of "step", written out per sample with the sampler's own step function:
    after global step g, sample b (n_b steps, L the largest) has taken max(0, g + 1 - (L - n_b))
    steps; before its first one it holds its diffused image, and with n_b = 0 its input."""
    p = d.attack_purifier
    t, _ = d.noise_levels(x, seeds)
    pseeds = mix_seeds(seeds, 1).tolist()
    n = torch.round(t.double() / DT).long().tolist()
    big_l = max(n)
    dd = p.diffusion
    rows = []
    for b in range(x.shape[0]):
        stream = NoiseStream([pseeds[b]], SHAPE, "cpu", x.dtype)
        ab = dd.alpha_bar(torch.tensor([n[b] * DT], dtype=torch.float64)).to(x.dtype)
        xm = ab.sqrt() * (2 * x[b:b + 1] - 1) + (1 - ab).sqrt() * stream.draw()
        states = []
        for g in range(big_l):
            if g >= big_l - n[b]:
                cur = torch.tensor([big_l - g])
                xm = p.sampler.step(p.model, xm, cur, cur - 1, stream.draw(), None)
            states.append(x[b:b + 1] if n[b] == 0 else ((xm + 1) / 2).clamp(0, 1))
        rows.append(torch.cat(states, 0))
    return torch.stack(rows, 1)  # [S,B,C,H,W]


def test_per_step_gradient_equals_autograd_of_the_mean_step_loss_by_hand():
    d = _defense()
    x, y, seeds = _images(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6) + 3
    view = Seeded(d.view("full"), seeds)
    loss, grad, logits = per_step_gradient(view, x, y, ce_loss)
    xr = x.clone().requires_grad_(True)
    states = _hand_steps(d, xr, seeds)
    hand_logits = torch.stack([d.classify(s) for s in states])
    hand = F.cross_entropy(hand_logits.reshape(-1, 3), y.repeat(len(states)), reduction="none")
    (hand_grad,) = torch.autograd.grad(hand.view(len(states), 6).mean(0).sum(), xr)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(view.stepwise(x), hand_logits.detach(), rtol=1e-5, atol=1e-6)
    # returned: the final step's loss and logits (what the defense outputs)
    assert torch.equal(logits, view(x)) and torch.equal(loss, ce_loss(logits, y))
    # ... and the gradient is not the final-only one (the test would notice the difference)
    _, final_grad, _ = plain_gradient(view, x, y, ce_loss)
    assert (grad - final_grad).abs().max() > 1e-3 * final_grad.abs().max()


def test_bpda_steps_pass_the_mean_step_gradient_straight_to_x():
    d = _defense()
    x, y, seeds = _images(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    _, grad, _ = per_step_gradient(Seeded(d.view("bpda"), seeds), x, y, ce_loss)
    states = d.view("bpda").stepwise(x, seeds).shape[0]
    hand = torch.zeros_like(x)
    with torch.no_grad():
        p = d.attack_purifier
        t, _ = d.noise_levels(x, seeds)
        traj = p.trajectory(x, t, seeds=mix_seeds(seeds, 1))
    for s in traj:  # identity Jacobian: each step's classifier gradient lands on x directly
        s = s.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(d.classify(s), y, reduction="sum") / states, s)
        hand += g
    torch.testing.assert_close(grad, hand, rtol=1e-5, atol=1e-7)


def test_pgd_with_the_per_step_loss_stays_in_the_ball_and_beats_random_noise():
    d = _defense(purifier={"sampler": "diffpure", "dt": DT}, per_sample_t=False)
    x, seeds = _images(16, seed=4), torch.arange(16)
    with torch.no_grad():
        y = d(x, seeds).argmax(1)  # the defense's own clean predictions: accuracy 1 on this draw
    eps = 0.1
    view = Seeded(d.view("full"), seeds)
    attack = per_step(PGD(eps=eps, steps=10, step_size=0.025))
    x_adv = attack(view, x, y, seed=0)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_rand = (x + eps * signs).clamp(0, 1)
    with torch.no_grad():
        adv, rnd = d(x_adv, seeds), d(x_rand, seeds)
    assert ce_loss(adv, y).mean() > ce_loss(rnd, y).mean() + 0.1
    assert (adv.argmax(1) == y).float().mean() < (rnd.argmax(1) == y).float().mean()


def test_per_step_wrapper_composes_with_eot_both_ways():
    base = PGD(eps=0.05, steps=2, step_size=0.02)
    ps = per_step(base)
    assert ps is not base and ps.grad_fn is per_step_gradient and base.grad_fn is plain_gradient
    assert ps.describe()["per_step"] and not base.describe()["per_step"]
    eot = EOT(ps, samples=2)
    assert isinstance(eot.grad_fn, EOTGradient) and eot.grad_fn.base is per_step_gradient
    assert eot.describe()["per_step"] and eot.describe()["eot"] == 2
    inner_eot = EOT(base, samples=2)
    wrapped = per_step(inner_eot)  # the EOT stays, the per-step loss goes under it
    assert wrapped.grad_fn.base is per_step_gradient and inner_eot.grad_fn.base is plain_gradient
    d = _defense(purifier={"sampler": "ddpm", "steps": 2})
    x, y = _images(4), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    for attack in (eot, wrapped):
        x_adv = attack(d.view("full"), x, y, seed=1)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and not torch.equal(x_adv, x)
    loss, grad, logp = EOTGradient(3, base=per_step_gradient)(d.view("adaptive"), x, y, ce_loss)
    assert loss.shape == (4,) and grad.shape == x.shape and logp.shape == (4, 3)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_model_without_stepwise_is_a_clear_error():
    x, y = _images(2), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"stepwise\(x\).*Sequential has none"):
        per_step_gradient(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), x, y, ce_loss)
    d = _defense()
    plain = d.replace(attack_purifier=nn.Identity())
    with pytest.raises(TypeError, match="trajectory.*Identity"):
        plain.view("full").stepwise(x)


def test_trajectory_holds_inputs_and_diffused_images_until_each_sample_starts():
    sm = GaussianScoreModel(mean=0.1, std=0.4, shape=SHAPE)
    p = build_purifier(sm, PurifierConfig(sampler="diffpure", dt=DT))
    x, seeds = _images(3), torch.tensor([1, 2, 3])
    t = torch.tensor([0.0, 0.01, 0.03])  # 0, 2 and 6 steps
    traj = p.trajectory(x, t, seeds=seeds)
    assert len(traj) == 6 and torch.equal(traj[-1], p(x, t, seeds=seeds))
    assert all(torch.equal(s[0], x[0]) for s in traj)  # t* = 0: the input at every step
    diffused = ((p.diffuse(x, t, seeds=seeds) + 1) / 2).clamp(0, 1)
    assert all(torch.equal(s[1], diffused[1]) for s in traj[:4])  # not started: its diffused image
    assert not torch.equal(traj[4][1], diffused[1]) and not torch.equal(traj[0][2], diffused[2])
    assert all(s.min() >= 0 and s.max() <= 1 for s in traj)
    none = p.trajectory(x, 0.0, seeds=seeds)  # no reverse step at all: the output is the only entry
    assert len(none) == 1 and torch.equal(none[0], x)
    gns = build_purifier(sm, PurifierConfig(sampler="gns", stages=[0.5, 1.0], inner="diffpure", dt=DT))
    assert len(gns.trajectory(x, t, seeds=seeds)) == 3 + 6  # each stage's largest step count
