import pytest
import torch
from torch import nn

from ssni.attacks import ATTACKS, EOT, PGD, EOTGradient, apgd_checkpoints, plain_gradient
from ssni.attacks.base import LOSSES
from ssni.evaluate.checks import epsilon_checks, gradient_check, randomness_check


def _toy_data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, 4, 4), 0.3) + 0.4 * y.view(-1, 1, 1, 1).float()
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def toy_classifier():
    """A tiny linear classifier trained to separate two brightness classes (margin ~0.2)."""
    torch.manual_seed(0)
    x, y = _toy_data()
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval().requires_grad_(False)
    assert (net(x).argmax(1) == y).float().mean() == 1.0
    return net


def _make(name, source):
    kw = dict(eps=0.3, norm="linf", steps=10)
    if name in ("pgd", "lownoise"):
        kw["step_size"] = 0.05
    if name == "transfer":
        kw.update(source=source, step_size=0.05)
    if name == "autoattack":  # AutoAttack's own settings: no steps, its iterations
        kw = dict(eps=0.3, norm="linf", version="custom", attacks=["apgd-ce"], n_iter=10)
    return ATTACKS.create(name, **kw)


class WithTStar(nn.Module):
    """A classifier with a stand-in for a defense's t*(x) and score norm (what lownoise lowers)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, seeds=None):
        return self.net(x)

    def with_t_star(self, x, seeds=None):
        """(logits [B,K], t [B], s [B]): t and s grow with the distance from mid-grey."""
        s = (x - 0.5).flatten(1).norm(dim=1) + 1e-3
        return self.net(x), 0.1 * torch.tanh(s), s


def test_pgd_breaks_undefended_classifier(toy_classifier):
    x, y = _toy_data(seed=1)
    x_adv = PGD(eps=0.3, steps=20, step_size=0.05)(toy_classifier, x, y, seed=0)
    acc = (toy_classifier(x_adv).argmax(1) == y).float().mean().item()
    assert acc < 0.05
    # a budget smaller than the class margin cannot flip these samples
    x_small = PGD(eps=0.01, steps=10, step_size=0.005)(toy_classifier, x, y, seed=0)
    assert (toy_classifier(x_small).argmax(1) == y).float().mean().item() > 0.95


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_every_attack_stays_in_ball_and_box(name, norm, eps, toy_classifier, extra):
    if name == "autoattack":
        extra("pyautoattack", "autoattack")
    x, y = _toy_data(32, seed=2)
    attack = _make(name, toy_classifier)
    attack.eps, attack.norm = eps, norm
    if hasattr(attack, "inner"):
        attack.inner.eps, attack.inner.norm = eps, norm
    model = WithTStar(toy_classifier) if name == "lownoise" else toy_classifier
    x_adv = attack(model, x, y, seed=0)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if name != "autoattack":  # AutoAttack returns the points it cannot fool unchanged
        assert not torch.equal(x_adv, x)


def test_attack_rejects_bad_inputs(toy_classifier):
    x, y = _toy_data(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD()(toy_classifier, x * 3, y)
    with pytest.raises(ValueError, match="linf, l2"):
        PGD(norm="l1")


class NoisyDefense(nn.Module):
    """A randomized toy defense: classify x + Gaussian noise."""

    def __init__(self, net, std=0.3):
        super().__init__()
        self.net, self.std = net, std

    def forward(self, x):
        return self.net(x + self.std * torch.randn_like(x))


def test_eot_lowers_gradient_variance(toy_classifier):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    defense = NoisyDefense(model, std=0.5)
    x, y = _toy_data(8, seed=3)
    loss = LOSSES.get("ce")

    def spread(oracle):
        grads = torch.stack([oracle(defense, x, y, loss)[1] for _ in range(20)])
        return grads.var(0).mean().item()

    v1, v16 = spread(plain_gradient), spread(EOTGradient(16))
    assert v16 < v1 / 4  # about 1/16 in expectation


def test_eot_wraps_any_attack_in_a_new_attack_leaving_the_given_one_unchanged(toy_classifier):
    plain = PGD(eps=0.1, steps=3, step_size=0.05)
    attack = EOT(plain, samples=5)
    assert isinstance(attack, PGD) and attack.eot_samples == 5 and attack is not plain
    assert plain.grad_fn is plain_gradient and plain.eot_samples == 1 and not plain.eot_selective
    twice = EOT(plain, samples=3)  # the same attack wrapped again is not EOT of EOT
    assert twice.grad_fn.base is plain_gradient and attack.grad_fn.samples == 5
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return toy_classifier(x)

    x, y = _toy_data(6)
    attack(Counting(), x, y, seed=0)
    assert calls == [30, 30, 30]  # one batched call of 5 copies per iteration


def test_quantisation_defense_trips_gradient_check(toy_classifier):
    class Quantised(nn.Module):
        def forward(self, x):
            return toy_classifier(torch.round(x * 4) / 4)  # zero gradient almost everywhere

    x, y = _toy_data(16)
    assert gradient_check(Quantised(), x, y)["flag"] is not None
    assert gradient_check(toy_classifier, x, y)["flag"] is None
    # and the attack fails against it even at a huge epsilon: the epsilon check catches that
    x_adv = PGD(eps=0.45, steps=10, step_size=0.1, random_start=False)(Quantised(), x, y)
    acc_huge = (Quantised()(x_adv).argmax(1) == y).float().mean().item()
    assert epsilon_checks([0.0, 0.45], [1.0, acc_huge], chance=0.5, huge_eps=0.4)
    assert not epsilon_checks([0.0, 0.1, 0.45], [1.0, 0.4, 0.0], chance=0.5, huge_eps=0.4)
    assert epsilon_checks([0.0, 0.1, 0.2], [0.9, 0.3, 0.6], chance=0.5)


def test_randomness_without_eot_is_flagged(toy_classifier):
    x, _ = _toy_data(8)
    assert randomness_check(NoisyDefense(toy_classifier), x, eot_samples=1)["flag"]
    assert randomness_check(NoisyDefense(toy_classifier), x, eot_samples=8)["flag"] is None
    assert randomness_check(toy_classifier, x, eot_samples=1)["flag"] is None


def test_apgd_checkpoints_match_the_schedule():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 for 100 iterations
    assert apgd_checkpoints(100)[:6] == [22, 41, 57, 70, 80, 87]


def test_dlr_loss_hand_values():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    # true class 0 is top: -(3 - 1) / (3 - 0) ; true class 2: -(0 - 3) / (3 - 0)
    assert LOSSES.get("dlr")(z, torch.tensor([0])).item() == pytest.approx(-2 / 3)
    assert LOSSES.get("dlr")(z, torch.tensor([2])).item() == pytest.approx(1.0)


def test_eot_around_the_transfer_attack_is_refused_in_one_line():
    """EOT over a deterministic source repeated one gradient N times while the report said EOT N."""
    from ssni.evaluate.specs import AttackSpec, make_attack

    spec = AttackSpec(name="t", attack="transfer", eot=4, view="full",
                      kwargs={"eps": 0.1, "steps": 2, "step_size": 0.05})
    with pytest.raises(ValueError, match="transfer attack takes its gradients from its deterministic source"):
        make_attack(spec, source=nn.Linear(4, 2))
    make_attack(AttackSpec(name="t", attack="transfer", eot=1, view="full",
                           kwargs={"eps": 0.1, "steps": 2, "step_size": 0.05}), source=nn.Linear(4, 2))
