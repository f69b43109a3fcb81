"""The low-noise attack: it lowers the t* an SSNI defense gives its adversarial images below what
PGD-EOT's get at the same budget and seed, keeps two_stage's classifier fooled, composes with EOT,
refuses what cannot work, and runs in `ssni evaluate` (rows, worst case, resume).

The defense is tiny and built here in a few seconds: scikit-learn's 8x8 digits, the exact score of a
per-pixel Gaussian fitted to them (no training), a small CNN trained for 40 steps, the SSNI-N
reweight calibrated on clean digits and a 2-step DDPM purifier.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ssni.attacks import ATTACKS, EOT, PGD, EOTGradient, LowNoise, keep_fooled_loss, per_step, t_star_loss
from ssni.attacks.base import LOSSES, plain_gradient
from ssni.data import DataConfig, build_dataset
from ssni.defense import RobustClassifier, _purifier
from ssni.evaluate.runner import BoundSeeds, Evaluation
from ssni.models.analytic import GaussianScoreModel
from ssni.scoring import ScoreNormConfig, build_reweight, calibrate

sys.path.insert(0, str(Path(__file__).parent))  # fixtures and helpers of other test files
from test_evaluate_plus import _config, tiny_setup  # noqa: E402,F401  (tiny_setup: a fixture)

N = 16
KW = {"eps": 0.05, "steps": 10, "step_size": 0.01}  # the shared budget; EOT 2 everywhere


@pytest.fixture(scope="module")
def defense():
    """(defense, images [N,1,8,8], labels [N]): a tiny SSNI-N defense on 8x8 digits."""
    cfg = DataConfig(name="digits", image_size=8)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    xm = train.images * 2 - 1  # model space
    score = GaussianScoreModel(mean=xm.mean(0), std=xm.std(0).clamp_min(0.05), shape=(1, 8, 8))
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # noisy inputs, so purified digits are still recognised
        idx = torch.randint(0, train.images.shape[0], (128,), generator=g)
        x = (train.images[idx] + 0.1 * torch.randn(128, 1, 8, 8, generator=g)).clamp(0, 1)
        loss = nn.functional.cross_entropy(clf(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sn = ScoreNormConfig(timesteps=4)
    cal, _ = calibrate(score, train.images[:256], sn, batch_size=256)
    d = RobustClassifier(classifier=clf.eval(), score_model=score,
                         purifier=_purifier(score, {"sampler": "ddpm", "steps": 2}),
                         reweight=build_reweight("sigmoid", cal, t_base=0.3), calibration=cal, score_norm=sn,
                         input_size=8)
    return d, test.images[:N], test.labels[:N]


def _mean_t(d, x):
    """Mean t* the defense gives images x (fixed score-norm seeds: the same draw for every set)."""
    with torch.no_grad():
        return d.noise_levels(x, torch.arange(x.shape[0]) + 500)[0].mean().item()


def _in_ball(x_adv, x, eps):
    return (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_low_noise_attack_gives_lower_t_star_than_pgd_eot(defense):
    d, x, y = defense
    torch.manual_seed(0)
    pgd = EOT(PGD(**KW), 2)(d.view("full"), x, y, seed=0)
    t_clean, t_pgd = _mean_t(d, x), _mean_t(d, pgd)
    assert t_pgd > t_clean + 0.05  # PGD-EOT pushes images off the data: the defense adds more noise
    got = {}
    for mode, view in (("joint", "adaptive"), ("two_stage", "bare")):
        torch.manual_seed(0)
        x_adv = EOT(LowNoise(**KW, mode=mode), 2)(d.view(view), x, y, seed=0)
        assert _in_ball(x_adv, x, KW["eps"]) and not torch.equal(x_adv, x)
        got[mode] = _mean_t(d, x_adv)
    # measured: clean 0.130, PGD-EOT 0.300, joint 0.148, two_stage 0.179
    assert got["joint"] < t_pgd - 0.05 and got["two_stage"] < t_pgd - 0.05, (t_pgd, got)
    # lowering t* itself (the smooth reweight's value) also works, with lam on t*'s scale
    torch.manual_seed(0)
    x_adv = EOT(LowNoise(**KW, target="t_star", lam=10.0), 2)(d.view("adaptive"), x, y, seed=0)
    assert _mean_t(d, x_adv) < t_pgd - 0.05


def test_two_stage_keeps_the_classifier_fooled_and_only_lowers_the_score_norm(defense):
    d, x, y = defense
    seeds = torch.arange(N) + 7
    bare = BoundSeeds(d.view("bare"), seeds)  # fixed score-norm draws: every comparison below is exact
    attack = LowNoise(**KW, mode="two_stage")
    fool, lower = attack.stage_steps()
    assert (fool, lower) == (5, 5)
    first = PGD(**{**KW, "steps": fool})(bare, x, y, seed=3)  # stage one alone: same start, same steps
    final = attack(bare, x, y, seed=3)
    assert _in_ball(final, x, KW["eps"])
    with torch.no_grad():
        z1, _, s1 = bare.with_t_star(first)
        z2, _, s2 = bare.with_t_star(final)
    fooled = z1.argmax(1) != y
    assert 0 < fooled.sum() < N  # some samples fooled by stage one, some not
    assert (z2.argmax(1)[fooled] != y[fooled]).all()  # still fooled
    assert (s2[fooled] <= s1[fooled]).all() and (s2[fooled] < s1[fooled]).float().mean() > 0.5


def test_loss_terms_and_the_oracle_under_eot(defense):
    d, x, y = defense
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    yy, t, s = torch.tensor([0, 0]), torch.tensor([0.1, 0.2]), torch.tensor([1.0, torch.e])
    ce = LOSSES.get("ce")(z, yy)
    torch.testing.assert_close(t_star_loss(LOSSES.get("ce"), 2.0, "t_star")(z, yy, t, s), ce - 2 * t)
    torch.testing.assert_close(t_star_loss(LOSSES.get("ce"), 2.0)(z, yy, t, s), ce - 2 * torch.tensor([0.0, 1.0]))
    # the margin counts only while the sample is not fooled: sample 0 is right (margin -2), sample 1 fooled
    torch.testing.assert_close(keep_fooled_loss(LOSSES.get("margin"), 1.0, "t_star")(z, yy, t, s),
                               torch.tensor([-2.1, -0.2]))
    # EOT with seeds per copy: the same t*-loss gradient however the copies are chunked
    view, loss = d.view("adaptive"), t_star_loss(LOSSES.get("ce"), 1.0)
    got = []
    for max_batch in (4096, 4):
        torch.manual_seed(5)
        got.append(EOTGradient(3, max_batch)(view, x[:4], y[:4], loss))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b)
    assert got[0][1].abs().sum() > 0
    with pytest.raises(TypeError, match="with_t_star"):
        plain_gradient(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x[:2], y[:2], loss)


def test_bad_settings_are_one_line_errors():
    for kw, match in (({"mode": "both"}, "mode must be one of joint, two_stage"), ({"lam": -1}, "lam must be >= 0"),
                      ({"target": "norm"}, "target must be one of t_star, score_norm"),
                      ({"mode": "two_stage", "split": 1.0}, "split"), ({"mode": "two_stage", "steps": 1}, "steps >= 2")):
        with pytest.raises(ValueError, match=match):
            ATTACKS.create("lownoise", **kw)
    a = LowNoise(steps=4)
    a.check_view("adaptive")
    a.check_view("bare")
    for view in ("full", "bpda", "fixed"):
        with pytest.raises(ValueError, match="needs a view whose t"):
            a.check_view(view)
    with pytest.raises(ValueError, match="per_step cannot wrap LowNoise"):
        per_step(a)
    assert LowNoise(steps=10, mode="two_stage", split=0.3).budget_head() == (
        "two_stage ce 3 it, then lower log score norm 7 it (lam 1), EOT 1")
    assert EOT(LowNoise(steps=4, lam=10, target="t_star"), 3).budget_head() == "joint ce - 10 t*, 4 it, EOT 3"


# -- in `ssni evaluate` ----------------------------------------------------------------------------

LOW = {"eps": 0.1, "steps": 2, "step_size": 0.05}
ATTACK_LIST = [{"name": "pgd", "attack": "pgd", "eot": 2, "kwargs": LOW},
               {"name": "low-joint", "attack": "lownoise", "eot": 2, "view": "adaptive",
                "only_sample_specific": True, "kwargs": {**LOW, "mode": "joint"}},
               {"name": "low-2stage", "attack": "lownoise", "view": "bare", "only_sample_specific": True,
                "kwargs": {**LOW, "mode": "two_stage"}}]


def _eval_config(root, run_dir, attacks=ATTACK_LIST):
    return _config(root, run_dir, attacks=attacks, defenses=[
        {"name": "none"}, {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}},
        {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}])


def test_lownoise_in_an_evaluation_rows_worst_case_and_resume(tiny_setup, tmp_path):  # noqa: F811
    ev = Evaluation(_eval_config(tiny_setup, tmp_path / "full"))
    assert ev.budgets["low-joint"] == ("lownoise joint ce - 1 log score norm, 2 it, EOT 2, through score norm, "
                                       "t*(x) and defense purifier ddpm(steps=1, clip=True)")
    assert ev.budgets["low-2stage"].startswith("lownoise two_stage ce 1 it, then lower log score norm 1 it")
    ev.run()
    res = json.loads((tmp_path / "full/results.json").read_text())
    # only the sample-specific defense meets the low-noise attacks
    assert [(r["defense"], r["attack"]) for r in res["rows"]] == [
        ("none", "pgd"), ("dbp", "pgd"), ("ssni-n", "pgd"), ("ssni-n", "low-joint"), ("ssni-n", "low-2stage")]
    rows = {r["attack"]: r for r in res["rows"] if r["defense"] == "ssni-n"}
    for name in ("low-joint", "low-2stage"):  # the t* the defense gave the attack's images, per image too
        ts = res["per_sample"][f"ssni-n/{name}"]["t_star"]
        assert len(ts) == 6 and rows[name]["mean_t_adv"] == pytest.approx(sum(ts) / 6)
    wc = {r["defense"]: r for r in res["worst_case"]}
    assert wc["ssni-n"]["attacks"] == ["pgd", "low-joint", "low-2stage"] and "dbp" not in wc
    assert wc["ssni-n"]["robust_worst"] <= min(r["robust_worst"] for r in rows.values()) + 1e-9
    assert "t_star" in res["plots"]
    # a stopped run resumes to the same numbers
    with pytest.raises(KeyboardInterrupt):
        Evaluation(_eval_config(tiny_setup, tmp_path / "part"), stop_after_batches=7).run()
    Evaluation(_eval_config(tiny_setup, tmp_path / "part")).run()
    part = json.loads((tmp_path / "part/results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(part["rows"]) == strip(res["rows"]) and strip(part["worst_case"]) == strip(res["worst_case"])


def test_lownoise_specs_that_cannot_work_fail_before_any_image_is_attacked(tiny_setup, tmp_path):  # noqa: F811
    from ssni.config import ConfigError

    for bad, match in (({"view": "full"}, "needs a view whose t"), ({"fixed_seeds": True}, "fixed_seeds attacks"),
                       ({"per_step": True}, "per_step cannot wrap LowNoise")):
        spec = {"name": "low", "attack": "lownoise", "view": "adaptive", "kwargs": LOW, **bad}
        with pytest.raises(ConfigError, match=match):
            Evaluation(_eval_config(tiny_setup, tmp_path / "bad", attacks=[spec]))
