"""Reweighting functions: monotone, bounded, formulas, batch independence, learned fit, oracle."""
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssni.attacks import PGD
from ssni.scoring import (
    REWEIGHTS,
    Calibration,
    LearnedReweight,
    RobustFitConfig,
    build_reweight,
    fit_robust,
    interpolate_accuracy,
    oracle_t_star,
    summarize,
    table_scores,
)
from ssni.scoring.learned import attack_accuracies, robust_accuracy, soft_minimum


def _calibration(seed=0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    norms = 50.0 + 5.0 * torch.randn(500, generator=g)
    return Calibration(**summarize(norms), fingerprint="x", score_norm={"timesteps": 20})


def _make(name, **kw):
    extra = {"learned": {"knots": [40.0, 50.0, 55.0, 70.0], "logits": [0.3, -1.0, 2.0, 0.1, 0.0]}}
    return build_reweight(name, _calibration(), **{**extra.get(name, {}), **kw})


@pytest.mark.parametrize("name", REWEIGHTS.names())
@pytest.mark.parametrize("smooth", [False, True])
def test_every_reweight_is_monotone_and_bounded(name, smooth):
    rw = _make(name, t_min=0.02, t_max=0.25)
    s = torch.cat([torch.linspace(-100, 300, 4001), torch.tensor([0.0, 1e6, -1e6])]).sort().values
    t = rw(s, smooth=smooth)
    assert t.shape == s.shape and torch.isfinite(t).all()
    assert (t >= 0.02 - 1e-7).all() and (t <= 0.25 + 1e-7).all()
    assert (t[1:] >= t[:-1] - 1e-7).all()
    if not smooth:  # the plain call lands on the 1/1000 grid (or a bound)
        on_grid = torch.isclose(t * 1000, torch.round(t * 1000), atol=1e-3)
        assert (on_grid | torch.isclose(t, torch.tensor(0.02)) | torch.isclose(t, torch.tensor(0.25))).all()


@pytest.mark.parametrize("name", [n for n in REWEIGHTS.names() if n != "constant"])
def test_smooth_variants_pass_gradients(name):
    rw = _make(name)
    s = torch.tensor([45.0, 50.0, 52.0, 60.0], requires_grad=True)
    (g,) = torch.autograd.grad(rw(s, smooth=True).sum(), s)
    assert torch.isfinite(g).all() and (g > 0).all()
    (g0,) = torch.autograd.grad(rw(s, smooth=False).sum(), s, allow_unused=True)
    assert g0 is None or (g0 == 0).all()  # rounding: no useful gradient without smoothing


def test_sigmoid_matches_formula():
    cal = _calibration()
    rw = build_reweight("sigmoid", cal, t_base=0.1, b=0.005, tau=2.0)
    s = torch.tensor([cal.mean - 10, cal.mean - 1, cal.mean, cal.mean + 3, cal.mean + 50])
    expected = torch.sigmoid((s - cal.mean) / 2.0) * 0.105
    torch.testing.assert_close(rw(s, smooth=True), expected)
    torch.testing.assert_close(rw(s, smooth=False), torch.round(expected * 1000) / 1000)
    assert rw(torch.tensor([cal.mean]), smooth=True).item() == pytest.approx(0.0525)
    # tau defaults to the calibrated std, mu to the calibrated mean
    rw2 = build_reweight("sigmoid", cal)
    assert (rw2.mu, rw2.tau) == (pytest.approx(cal.mean), pytest.approx(cal.std))


def test_linear_is_batch_independent_and_uses_calibrated_range():
    cal = _calibration()
    rw = build_reweight("linear", cal, t_base=0.1, b=0.005, q_low=0.05, q_high=0.95)
    lo, hi = cal.quantile(0.05), cal.quantile(0.95)
    s = torch.tensor([lo, (lo + hi) / 2, hi, hi + 100])
    torch.testing.assert_close(rw(s, smooth=False), torch.tensor([0.005, 0.055, 0.105, 0.105]))
    target = torch.tensor([52.0])
    alone = rw(target)
    for companions in (torch.tensor([1e5, 2e5]), torch.tensor([0.0]), torch.linspace(40, 60, 9)):
        for smooth in (False, True):
            batch = torch.cat([companions, target])
            assert rw(batch, smooth=smooth)[-1] == rw(target, smooth=smooth)[0]
    assert alone.item() > 0.005


def test_reweights_need_a_calibration_or_explicit_values():
    with pytest.raises(ValueError, match="needs a calibration"):
        build_reweight("sigmoid")
    assert build_reweight("sigmoid", mu=1.0, tau=1.0)(torch.tensor([1.0]), smooth=True).item() \
        == pytest.approx(0.0525)
    with pytest.raises(ValueError, match="t_min"):
        build_reweight("constant", t_min=0.5, t_max=0.1)
    with pytest.raises(ValueError, match="1-D"):
        build_reweight("constant")(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        build_reweight("constant")(torch.tensor([1.0, float("nan")]))
    with pytest.raises(KeyError, match="valid choices"):
        build_reweight("nope")


GRID = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])


def _analytic_tables(n=200, seed=0):
    """A setting whose best curve is known: a clean image (norm in [1, 2)) is right iff t <= 0.1; a copy
    attacked with strength k (norm 2 + k + u, u in [0, 1)) is right iff t >= 0.05 * (k + 1) (k = 0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    clean_s = 1.0 + torch.rand(n, generator=g)
    clean_acc = (GRID[None, :] <= 0.1 + 1e-9).float().expand(n, -1).clone()
    adv_s = torch.stack([2.0 + k + torch.rand(n, generator=g) for k in range(3)], 1)
    need = torch.tensor([0.05, 0.1, 0.15])
    adv_acc = (GRID[None, None, :] >= need[None, :, None] - 1e-9).float().expand(n, 3, -1).clone()
    return clean_s, clean_acc, adv_s, adv_acc


def _best_curve(s):
    """A curve that gets every analytic image right: <= 0.1 on clean norms, >= the need on attacked ones."""
    return torch.where(s < 2, torch.zeros_like(s), 0.05 * (torch.floor(s) - 1))


def test_fit_robust_recovers_the_known_best_curve():
    clean_s, clean_acc, adv_s, adv_acc = _analytic_tables()
    curve, info = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc,
                             RobustFitConfig(knots=16, steps=300, restarts=2, t_max=0.3))
    assert info["clean"] == pytest.approx(1.0, abs=0.02) and info["robust"] > 0.95, info
    probe = torch.tensor([1.2, 1.8, 2.5, 3.5, 4.5])
    with torch.no_grad():
        t = curve(probe)
    # clean norms: at most 0.1 (right); attacked: at least what each strength needs
    assert t[0] <= 0.1 + 1e-6 and t[1] <= 0.1 + 1e-6
    assert t[2] >= 0.05 - 2e-3 and t[3] >= 0.1 - 2e-3 and t[4] >= 0.15 - 2e-3
    # the best curve scores 1 / 1 on the same tables; the learned one is as good within 2 images in 100
    best = table_scores(lambda v, smooth=False: _best_curve(v), GRID, clean_s, clean_acc, adv_s, adv_acc)
    assert best["clean"] == 1.0 and best["robust"] == 1.0
    mine = table_scores(curve, GRID, clean_s, clean_acc, adv_s, adv_acc)
    assert mine["clean"] >= 0.98 and mine["robust"] >= 0.95


def test_fit_robust_trades_clean_for_robust_as_weighted():
    # no norm separates clean from attacked: one constant t for both; clean wants 0, the attack 0.2
    n = 100
    clean_s = torch.linspace(1, 2, n)
    adv_s = clean_s[:, None].clone()
    clean_acc = (1.0 - GRID / 0.3).clamp(0, 1).expand(n, -1).clone()       # 1 at t=0, 0 at t=0.3
    adv_acc = (GRID / 0.2).clamp(0, 1).expand(n, 1, -1).clone()             # 0 at t=0, 1 at t>=0.2
    lo, _ = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, RobustFitConfig(knots=4, clean_weight=3.0, steps=200))
    hi, _ = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, RobustFitConfig(knots=4, clean_weight=0.3, steps=200))
    with torch.no_grad():
        t_lo, t_hi = lo(clean_s).mean().item(), hi(clean_s).mean().item()
    assert t_lo == pytest.approx(0.0, abs=0.01)  # clean weighs more: no noise
    assert t_hi == pytest.approx(0.2, abs=0.01)  # robust weighs more: just enough to undo the attack


def test_cap_credits_a_t_only_where_an_attack_aimed_at_it_failed():
    # The copies were crafted against t = 0.1: they fool purification there, look harmless below
    # (they were not aimed at less noise) and lose a little to the damage more noise does. Attacks
    # aimed at each t (the cap) succeed below 0.15. Clean images are right iff t <= 0.1.
    n = 100
    clean_s = torch.linspace(1, 1.99, n)
    clean_acc = (GRID <= 0.1 + 1e-9).float().expand(n, -1).clone()
    adv_s = torch.linspace(2, 2.99, n)[:, None].clone()
    row = torch.where(GRID < 0.1 - 1e-9, 1.0, torch.where(GRID < 0.15 - 1e-9, 0.0, 0.9))
    adv_acc = row.expand(n, 1, -1).clone()
    cap = (GRID >= 0.15 - 1e-9).float().expand(n, -1).clone()
    barely = lambda v, smooth=False: torch.zeros_like(v)  # noqa: E731 (no purification at all)
    # without the cap, not purifying looks perfectly robust; with it, it is worth nothing
    assert table_scores(barely, GRID, clean_s, clean_acc, adv_s, adv_acc)["robust"] == 1.0
    assert table_scores(barely, GRID, clean_s, clean_acc, adv_s, adv_acc, cap)["robust"] == 0.0
    cfg = RobustFitConfig(knots=8, steps=300, restarts=2, t_max=0.3)
    capped, info = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, cfg, cap=cap)
    with torch.no_grad():
        t_clean, t_adv = capped(torch.tensor([1.5])).item(), capped(torch.tensor([2.1, 2.5, 2.9]))
    # the known best answer under the cap: clean at <= 0.1, attacked at >= 0.15 (0.9 robust)
    assert t_clean <= 0.1 + 1e-6 and bool((t_adv >= 0.15 - 2e-3).all()), (t_clean, t_adv)
    assert info["capped"] and info["clean"] == pytest.approx(1.0, abs=0.02)
    assert info["robust"] == pytest.approx(0.9, abs=0.02)
    with pytest.raises(ValueError, match="cap must be a finite"):
        fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, cfg, cap=cap[:, :3])


def test_per_attack_robust_is_not_pulled_down_by_the_minimum_over_noisy_sets():
    # Two sets made by the same attack. Up to t = 0.1 every copy is right more often (0.8 there); at 0.15
    # each set is right on 85% of the images, but on different images (noisy purification), and
    # beyond that accuracy falls. The attack's accuracy peaks at 0.15 (0.85), while each image's
    # worst set peaks at t <= 0.1 (0.8 against 0.7): the minimum over sets prefers less noise.
    n = 100
    clean_s = torch.linspace(1, 1.99, n)
    clean_acc = (GRID <= 0.15 + 1e-9).float().expand(n, -1).clone()
    adv_s = torch.full((n, 2), 2.5)  # one norm: a single t* for every attacked copy
    adv_acc = torch.where(GRID <= 0.1 + 1e-9, 0.7 + GRID, 0.5).expand(n, 2, -1).clone()  # 0.8 at 0.1
    k = 3  # GRID[3] = 0.15
    wrong = torch.arange(n) % 20 < 3  # 15% of the images, a different 15% for the second set
    adv_acc[:, 0, k], adv_acc[:, 1, k] = (~wrong).float(), (~wrong.roll(10)).float()
    cfg = RobustFitConfig(knots=8, steps=300, restarts=2, t_max=0.3)
    per_attack, info = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, cfg, groups=[0, 0])
    worst, winfo = fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, replace(cfg, robust="worst_copy"))
    with torch.no_grad():
        t_pa, t_wc = per_attack(adv_s.flatten()), worst(adv_s.flatten())
    assert bool((t_pa - 0.15).abs().max() < 3e-3), t_pa
    assert bool((t_wc - 0.1).abs().max() < 3e-3), t_wc
    assert info["robust"] == pytest.approx(0.85, abs=0.01) and winfo["robust"] == pytest.approx(0.8, abs=0.01)
    assert info["robust_over"] == "per_attack" and winfo["robust_over"] == "worst_copy"
    scores = table_scores(per_attack, GRID, clean_s, clean_acc, adv_s, adv_acc, groups=[0, 0])
    assert scores["per_attack"] == [pytest.approx(0.85, abs=0.01)] and scores["worst_copy"] == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match="groups must name the attack of each"):
        fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, cfg, groups=[0])
    with pytest.raises(ValueError, match="robust must be one of"):
        fit_robust(GRID, clean_s, clean_acc, adv_s, adv_acc, replace(cfg, robust="mean"))


def test_robust_accuracy_is_the_worst_attack_or_each_images_worst_set():
    per_set = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert attack_accuracies(per_set, [0, 0, 1]).tolist() == [0.625, 0.75]
    assert attack_accuracies(per_set, None).tolist() == [0.75, 0.5, 0.75]
    assert robust_accuracy(per_set, "per_attack", [0, 0, 1]).item() == 0.625  # the worst attack
    assert robust_accuracy(per_set, "worst_copy").item() == 0.25  # only the last image survives all
    assert robust_accuracy(per_set, "per_attack", [0, 0, 1], 0.1).item() <= 0.625  # soft: never above


def test_interpolate_accuracy_and_soft_minimum():
    table = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    grid = torch.tensor([0.0, 0.1, 0.3])
    t = torch.tensor([0.05, 0.2], requires_grad=True)
    acc = interpolate_accuracy(table, grid, t)
    assert acc.tolist() == pytest.approx([0.5, 0.5])
    acc.sum().backward()
    assert t.grad.tolist() == pytest.approx([10.0, -5.0])  # the slopes of the two segments
    assert interpolate_accuracy(table, grid, torch.tensor([0.3, 0.0])).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="inside the accuracy grid"):
        interpolate_accuracy(table, grid, torch.tensor([0.31, 0.0]))
    v = torch.tensor([[0.2, 0.9, 0.5]])
    assert soft_minimum(v, 0.0).item() == pytest.approx(0.2)
    assert soft_minimum(v, 1e-3).item() == pytest.approx(0.2, abs=2e-3)
    assert soft_minimum(v, 0.1).item() <= 0.2 + 1e-6  # never above the hard minimum
    with pytest.raises(ValueError, match="do not fit together"):
        fit_robust(grid, torch.rand(3), torch.rand(3, 3), torch.rand(3, 2), torch.rand(3, 2, 2))


def test_learned_save_load_roundtrip(tmp_path):
    curve = _make("learned", t_max=0.3)
    curve.save(tmp_path / "reweight.json", extra={"fit": {"loss": 0.1}})
    back = build_reweight("learned", path=str(tmp_path))
    s = torch.linspace(0, 100, 77)
    torch.testing.assert_close(back(s), curve(s))
    assert back.t_max == 0.3
    with pytest.raises(ValueError, match="strictly increasing"):
        LearnedReweight(knots=[1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="fit-reweight"):
        LearnedReweight(path=str(tmp_path / "nothing.json"))


def test_learned_json_of_earlier_versions_still_loads(tmp_path):
    # the oracle-fit era wrote per_kind / oracle details beside the curve; the curve's fields are unchanged
    old = {"name": "learned", "knots": [100.0, 200.0, 400.0], "logits": [0.0, 1.0, 0.0, -1.0], "t_min": 0.0,
           "t_max": 0.3, "num_steps": 1000, "smooth_width": 0.05, "heights": [0.1, 0.2, 0.25],
           "fit": {"loss": 0.01, "under_rate": 0.2}, "per_kind": {"clean": {"mean_norm": 120.0}},
           "t_grid": [0.0, 0.1, 0.3]}
    (tmp_path / "reweight.json").write_text(json.dumps(old))
    curve = build_reweight("learned", path=str(tmp_path / "reweight.json"))
    ref = LearnedReweight(knots=old["knots"], logits=old["logits"], t_max=0.3)
    s = torch.linspace(50, 500, 31)
    torch.testing.assert_close(curve(s), ref(s))


def test_oracle_t_star_finds_smallest_good_level():
    # Toy purifier: moves x towards the class-0 prototype by t; classifier: x > 0.5 -> class 1.
    x = torch.tensor([0.55, 0.65, 0.75, 0.9, 0.3]).view(5, 1, 1, 1)
    y = torch.zeros(5, dtype=torch.long)

    def purify(xb, tb, seeds):
        return (xb - tb.view(-1, 1, 1, 1)).clamp(0, 1)

    def classify(xb):
        v = xb.flatten(1)[:, :1]
        return torch.cat([0.5 - v, v - 0.5], 1)

    grid = [0.0, 0.1, 0.2, 0.3]
    res = oracle_t_star(purify, classify, x, y, grid, max_batch=3)
    assert res["t"][:3].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert math.isnan(res["t"][3].item()) and not res["reachable"][3]
    assert res["t"][4].item() == 0.0  # right without purification
    assert res["correct"].shape == (5, 4)


def test_pgd_on_a_bare_classifier_stays_in_budget_and_hurts():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(32, 1, 4, 4)
    y = net(x).argmax(1)  # the net is right on all of them by construction
    adv = PGD(eps=0.1, steps=10, step_size=0.025)(net, x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y)
    assert (net(adv).argmax(1) == y).float().mean() < 1.0


def _tiny_defense(tmp_path):
    """A tiny score network, calibration, classifier and defense recipe (8x8 digits, 2 DDPM steps)."""
    import yaml

    from ssni.io import atomic_save_safetensors, atomic_write_json
    from ssni.models import classifier_spec, create_classifier, create_model, save_model
    from ssni.scoring import ScoreNormConfig, calibrate

    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():  # nudge the zero-initialised output layers so the score is not zero
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(tmp_path / "score", sm)
    cal, _ = calibrate(sm.eval(), torch.rand(16, 1, 8, 8), ScoreNormConfig(timesteps=3))
    cal.save(tmp_path / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(tmp_path / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(tmp_path / "clf" / "model.json", classifier_spec(clf))
    recipe = {"score_model": str(tmp_path / "score"),
              "calibration": str(tmp_path / "calibration.json"), "score_norm": {"timesteps": 3},
              "purifier": {"sampler": "ddpm", "steps": 2},
              "classifier": {"checkpoint": str(tmp_path / "clf")}, "mean": [0.0], "std": [1.0],
              "device": "cpu"}
    (tmp_path / "defense.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "defense.yaml"


RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "reweight" / "digits.yaml")
FIT_ARGS = ["defense_overrides=[]", "data.image_size=8", "count=12", "holdout=4", "alternations=1",
            "attacks.0.kwargs.steps=2", "attacks.1.kwargs.steps=2", "t_grid=[0.0,0.1,0.2]", "fit.t_max=0.2",
            "fit.steps=30", "fit.knots=4", "fit.restarts=1", "verify_draws=2", "batch_size=8",
            "progress=false", "device=cpu"]


def test_fit_reweight_cli_fits_against_attacks_and_resumes(tmp_path, monkeypatch):
    from ssni.cli import main
    from ssni.commands import fit_reweight

    recipe = _tiny_defense(tmp_path)
    out = tmp_path / "rw"
    argv = ["fit-reweight", RECIPE, f"output={out}", f"defense_recipe={recipe}"] + FIT_ARGS
    assert main(argv) == 0
    saved = json.loads((out / "reweight.json").read_text())
    assert saved["name"] == "learned" and saved["objective"] == "robust + 2 * clean"
    assert set(saved["trained_against"]) == {"pgd-eot", "adaptive"}
    assert "through score norm, t*(x) and defense purifier ddpm" in saved["trained_against"]["adaptive"]
    # round 0 (DBP at every grid level, the bare classifier included) then one alternation with both
    # attacks through the curve; the fit was capped by round 0's diagonal
    assert [len(r["attacked_sets"]) for r in saved["rounds"]] == [3, 5]
    assert saved["start_t"] == [0.0, 0.1, 0.2] and saved["capped"] and saved["fit"]["capped"]
    # robust over attacks: round 0's sets count as one attack, each attack of the recipe as another
    assert saved["robust_over"] == "per_attack" and saved["fit"]["robust_over"] == "per_attack"
    assert saved["attacks"] == ["pgd-eot through DBP (round 0)", "pgd-eot", "adaptive"]
    assert all(len(v["per_attack"]) == 3 for v in saved["on_fit_tables"].values())
    report = (out / "report.md").read_text()
    assert "| reweight | clean | robust | pgd-eot through DBP (round 0) | pgd-eot | adaptive | worst copy |" in report
    assert set(saved["heldout"]) == {"learned", "ssni-l", "ssni-n"}
    assert set(saved["heldout"]["learned"]) == {"clean", "pgd-eot", "adaptive"}
    assert saved["heldout"]["learned"]["clean"]["n"] == 4 and saved["heldout"]["learned"]["clean"]["draws"] == 2
    assert (out / "reweight.png").stat().st_size > 1000 and "Held-out" in (out / "report.md").read_text()
    curve = build_reweight("learned", path=str(out))
    t = curve(torch.linspace(0, 1e3, 50))
    assert (t[1:] >= t[:-1]).all() and t.max() <= 0.2 + 1e-6
    # a second run reuses every attacked set (no attack runs) and writes the same curve
    calls = []
    monkeypatch.setattr(fit_reweight.Fit, "attack", lambda self, *a: calls.append(a) or None)
    assert main(argv) == 0
    assert calls == [] and json.loads((out / "reweight.json").read_text())["logits"] == saved["logits"]


def test_fit_reweight_bad_inputs_fail_in_one_line(tmp_path):
    import yaml

    from ssni.commands.fit_reweight import FitReweightConfig, check_fit_config, check_fit_images_unseen, run_fit_reweight
    from ssni.config import ConfigError, load_config

    recipe = _tiny_defense(tmp_path)
    base = [f"output={tmp_path / 'rw'}", f"defense_recipe={recipe}"] + FIT_ARGS
    for extra, match in ((["count=0"], "count must be >= 2"), (["attacks=[]"], "attacks` is empty"),
                         (["holdout=12"], "holdout must be in"), (["fit.t_max=0.3"], "inside t_grid"),
                         (["start_t=[0.5]"], "outside t_grid"),
                         (["fit.robust=mean"], "fit.robust must be one of per_attack, worst_copy, got 'mean'"),
                         (["start_t=[0.1]"], r"cap needs round 0 at every t_grid point the curve can reach; "
                                             r"start_t lacks \[0.0, 0.2\]")):
        with pytest.raises(ConfigError, match=match):
            check_fit_config(load_config(FitReweightConfig, RECIPE, base + extra))
    check_fit_config(load_config(FitReweightConfig, RECIPE, base + ["start_t=[0.1]", "cap=false"]))  # no cap: fine
    for extra, match in ((["split=test"], "split must be one of train, reserve .clean training images only., "
                                          "got 'test'"),
                         (["data.reserve=0"], "split: reserve needs data.reserve >= 1")):
        with pytest.raises(ConfigError, match=match):
            check_fit_config(load_config(FitReweightConfig, RECIPE, base + extra))
    with pytest.raises(ConfigError, match="the reserve split of 'digits' has 384 images; set count <= 384"):
        run_fit_reweight(load_config(FitReweightConfig, RECIPE, base + ["count=5000"]))
    with pytest.raises(ConfigError, match="the train split of 'digits' has 1054 images; set count <= 1054"):
        run_fit_reweight(load_config(FitReweightConfig, RECIPE, base + ["count=5000", "split=train"]))
    # fitting on the reserve of a classifier whose run trained on it: refused, naming the fix
    run = {"data": {"name": "digits", "image_size": 8, "test_fraction": 0.2, "split_seed": 0, "reserve": 0},
           "loop": {"steps": 1}}
    (tmp_path / "clf" / "config.yaml").write_text(yaml.safe_dump(run))
    with pytest.raises(ConfigError, match=r"split: reserve, but the classifier at .*clf was trained with "
                                          r"data.reserve=0, so its training images may include the fit images; "
                                          r"train it with data.reserve=384 or fit on split: train"):
        run_fit_reweight(load_config(FitReweightConfig, RECIPE, base))
    run["data"]["reserve"] = 384  # the same reserve: the fit images are unseen, the check passes
    (tmp_path / "clf" / "config.yaml").write_text(yaml.safe_dump(run))
    check_fit_images_unseen(load_config(FitReweightConfig, RECIPE, base))
    (tmp_path / "score" / "config.yaml").write_text(yaml.safe_dump({**run, "data": {**run["data"], "split_seed": 3}}))
    with pytest.raises(ConfigError, match=r"the score network at .*score was trained with data.split_seed=3"):
        check_fit_images_unseen(load_config(FitReweightConfig, RECIPE, base))
    (tmp_path / "score" / "config.yaml").unlink()
    # no calibration: the reweights that need one say so
    (tmp_path / "calibration.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="calibration"):
        run_fit_reweight(load_config(FitReweightConfig, RECIPE, base))


def test_fit_reweight_shows_a_bar_and_a_time_for_every_attacked_set(tmp_path, monkeypatch, capsys):
    """Minutes pass between a fit's stage lines: each attacked set gets a bar with an ETA and a time."""
    from ssni.cli import main

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    recipe = _tiny_defense(tmp_path)
    args = [a for a in FIT_ARGS if a != "progress=false"] + ["progress=true", "alternations=0", "holdout=0"]
    assert main(["fit-reweight", RECIPE, f"output={tmp_path / 'rw'}", f"defense_recipe={recipe}"] + args) == 0
    captured = capsys.readouterr()
    done = re.findall(r"\[fit-reweight\] (\S+): done in \d+ s", captured.out)
    assert len(done) >= 4, captured.out  # the clean set and round 0's three DBP levels
    assert "[fit-reweight] " + done[-1] in captured.err and "img/s" in captured.err and "<" in captured.err
