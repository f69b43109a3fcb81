"""torchattacks against ssni's attack views: they run on a stochastic defense, and ssni's PGD-EOT is
at least as strong as torchattacks' EOTPGD and APGD (EOT) at the same budget.

The defense is tiny and built here in about two seconds: scikit-learn's 8x8 digits, the exact score
network of a per-pixel Gaussian fitted to them (no training), a small CNN trained for 60 steps, the
SSNI-N reweight calibrated on clean digits and a 3-step DDPM purifier. torchattacks is a test-only
dependency (the `test` extra); without it these tests are skipped.
"""
import pytest
import torch
from torch import nn

from ssni.attacks import EOT, PGD
from ssni.data import DataConfig, build_dataset
from ssni.defense import RobustClassifier, _purifier
from ssni.models.analytic import GaussianScoreModel
from ssni.scoring import ScoreNormConfig, build_reweight, calibrate

torchattacks = pytest.importorskip("torchattacks")

N, DRAWS = 48, 4
# Linf budget shared by every attack: informative at this scale (clean ~0.79, attacked ~0.2-0.35)
EPS, ALPHA, STEPS, EOT_SAMPLES = 0.08, 0.02, 10, 4


@pytest.fixture(scope="module")
def digits_defense():
    """(defense, test images [N,1,8,8], labels [N]): a tiny SSNI-N defense on 8x8 digits."""
    cfg = DataConfig(name="digits", image_size=8)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    xm = train.images * 2 - 1  # model space
    score = GaussianScoreModel(mean=xm.mean(0), std=xm.std(0).clamp_min(0.05), shape=(1, 8, 8))
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # noisy inputs, so purified digits are still recognised
        idx = torch.randint(0, train.images.shape[0], (128,), generator=g)
        x = (train.images[idx] + 0.1 * torch.randn(128, 1, 8, 8, generator=g)).clamp(0, 1)
        loss = nn.functional.cross_entropy(clf(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    sn = ScoreNormConfig(timesteps=4)
    cal, _ = calibrate(score, train.images[:256], sn, batch_size=256)
    defense = RobustClassifier(classifier=clf.eval(), score_model=score,
                               purifier=_purifier(score, {"sampler": "ddpm", "steps": 3}),
                               reweight=build_reweight("sigmoid", cal, t_base=0.3), calibration=cal,
                               score_norm=sn, input_size=8)
    return defense, test.images[:N], test.labels[:N]


def _accuracy(defense, x_adv, y):
    """Expected accuracy over DRAWS seeded defense draws, the same seeds for every adversarial set."""
    with torch.no_grad():
        hits = [(defense(x_adv, seeds=torch.arange(x_adv.shape[0]) + 1000 * m).argmax(1) == y).float().mean()
                for m in range(DRAWS)]
    return float(torch.stack(hits).mean())


def _check_adversarial(x_adv, x, eps, norm="linf"):
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("view", ["full", "adaptive", "bpda"])
def test_torchattacks_run_against_the_attack_views(digits_defense, view):
    defense, x, y = digits_defense
    x, y = x[:8], y[:8]
    surrogate = defense.attack_module(view)
    # what torchattacks reads from a model: parameters (for the device), .training, eval()/train()
    assert next(surrogate.parameters()).device == x.device and not surrogate.training
    attacks = [(torchattacks.EOTPGD(surrogate, eps=EPS, alpha=ALPHA, steps=2, eot_iter=2), EPS, "linf"),
               (torchattacks.APGD(surrogate, eps=EPS, steps=2, eot_iter=2, loss="ce"), EPS, "linf"),
               (torchattacks.APGD(surrogate, eps=EPS, steps=2, loss="dlr"), EPS, "linf"),
               (torchattacks.PGD(surrogate, eps=EPS, alpha=ALPHA, steps=2), EPS, "linf"),
               (torchattacks.PGDL2(surrogate, eps=0.5, alpha=0.2, steps=2), 0.5, "l2"),
               (torchattacks.FGSM(surrogate, eps=EPS), EPS, "linf")]
    for attack, eps, norm in attacks:
        torch.manual_seed(0)
        x_adv = attack(x, y)
        if isinstance(attack, torchattacks.APGD) and torch.equal(x_adv, x):
            continue  # torchattacks' APGD returns the clean image when no draw was fooled
        _check_adversarial(x_adv, x, eps, norm)
    # the attacks leave the defense as they found it: eval mode, frozen weights, no gradients kept
    assert not surrogate.training and not defense.training
    assert all(not p.requires_grad and p.grad is None for p in defense.parameters())


def test_attack_views_start_in_eval_mode():
    """torchattacks saves `model.training`, calls model.eval(), attacks, then calls model.train() if the
    saved flag was True. A view that starts in training mode therefore leaves the defense it wraps, and
    its classifier, in training mode: BatchNorm then normalises by batch statistics and overwrites its
    running statistics on the next defense call."""
    score = GaussianScoreModel(mean=0.0, std=0.5, shape=(1, 8, 8))
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 3))
    defense = RobustClassifier(classifier=clf, score_model=score,
                               purifier=_purifier(score, {"sampler": "ddpm", "steps": 2}),
                               reweight=build_reweight("constant", None, t_base=0.1), input_size=8)
    x, y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    running = clf[1].running_mean.clone()
    for name in ("full", "adaptive", "bpda", "bare"):
        torchattacks.PGD(defense.view(name), eps=EPS, alpha=ALPHA, steps=1)(x, y)
        with torch.no_grad():
            defense(x)
        assert not defense.training and not clf.training, f"view {name!r} left the defense in training mode"
        assert torch.equal(clf[1].running_mean, running), f"view {name!r}: BatchNorm statistics changed"


def test_ssni_pgd_eot_at_least_as_strong_as_torchattacks(digits_defense):
    defense, x, y = digits_defense
    surrogate = defense.attack_module()
    clean = _accuracy(defense, x, y)
    robust = {}
    torch.manual_seed(1)
    robust["torchattacks EOTPGD"] = _accuracy(defense, torchattacks.EOTPGD(
        surrogate, eps=EPS, alpha=ALPHA, steps=STEPS, eot_iter=EOT_SAMPLES)(x, y), y)
    torch.manual_seed(1)
    robust["torchattacks APGD-CE"] = _accuracy(defense, torchattacks.APGD(
        surrogate, eps=EPS, steps=STEPS, eot_iter=EOT_SAMPLES, loss="ce")(x, y), y)
    torch.manual_seed(1)
    ours = EOT(PGD(eps=EPS, step_size=ALPHA, steps=STEPS), EOT_SAMPLES)(surrogate, x, y, seed=0)
    _check_adversarial(ours, x, EPS)
    robust["ssni PGD-EOT"] = _accuracy(defense, ours, y)
    report = f"clean {clean:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in robust.items())
    print(f"\n{N} digits, {DRAWS} draws, eps {EPS}, step {ALPHA}, {STEPS} steps, EOT {EOT_SAMPLES}: {report}")
    # the comparison is not vacuous: every attack lowers accuracy clearly, none reaches zero
    assert clean >= 0.6, report
    for name, acc in robust.items():
        assert 0.0 < acc <= clean - 0.2, f"{name}: {report}"
    # ssni's PGD-EOT is not weaker than torchattacks' by more than one image of N
    for name in ("torchattacks EOTPGD", "torchattacks APGD-CE"):
        assert robust["ssni PGD-EOT"] <= robust[name] + 1 / N + 1e-6, f"weaker than {name}: {report}"
