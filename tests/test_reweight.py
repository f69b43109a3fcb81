"""Reweighting functions: monotone, bounded, formulas, batch independence, learned fit, oracle."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssni.attacks import PGD
from ssni.scoring import (
    REWEIGHTS,
    Calibration,
    LearnedFitConfig,
    LearnedReweight,
    build_reweight,
    fit_learned,
    oracle_t_star,
    summarize,
)
from ssni.scoring.learned import asymmetric_loss


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


def test_learned_recovers_known_monotone_curve():
    g = torch.Generator().manual_seed(0)
    s = 10 * torch.rand(3000, generator=g)

    def oracle(v):
        return 0.02 + 0.2 * torch.sigmoid(1.5 * (v - 5))

    # oracle values come on a 0.01 grid, as the grid search gives them
    t = torch.round(oracle(s) * 100) / 100
    curve, info = fit_learned(s, t, LearnedFitConfig(knots=14, steps=1500, t_max=0.3))
    probe = torch.linspace(0.5, 9.5, 50)
    with torch.no_grad():
        err = (curve(probe, smooth=True) - oracle(probe)).abs()
    assert err.max() < 0.015, err.max()
    assert info["count"] == 3000 and info["under_rate"] < 0.5


def test_learned_under_noising_costs_more():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(4000, generator=g)
    t = 0.1 + 0.05 * torch.randn(4000, generator=g)  # noisy oracle, flat in s
    sym, _ = fit_learned(s, t, LearnedFitConfig(knots=3, under_cost=1.0, steps=600))
    asym, _ = fit_learned(s, t, LearnedFitConfig(knots=3, under_cost=9.0, steps=600))
    with torch.no_grad():
        a, b = sym(torch.tensor([0.5]), True).item(), asym(torch.tensor([0.5]), True).item()
    assert a == pytest.approx(0.1, abs=0.01) and b > a + 0.02  # the fit leans towards more noise
    assert asymmetric_loss(torch.tensor([0.0]), torch.tensor([1.0]), 4.0).item() == 4.0
    assert asymmetric_loss(torch.tensor([1.0]), torch.tensor([0.0]), 4.0).item() == 1.0


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


def test_fit_reweight_cli(tmp_path):
    import yaml

    from ssni.cli import main
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
    out = tmp_path / "rw"
    rc = main(["fit-reweight", f"output={out}", f"defense_recipe={tmp_path / 'defense.yaml'}",
               "data.image_size=8", "count=12", "noise_std=[0.2]", "pgd_eps=[0.1]",
               "pgd_steps=2", "t_grid=[0.0,0.05,0.2]", "fit.steps=50", "fit.knots=4",
               "progress=false", "device=cpu"])
    assert rc == 0
    saved = json.loads((out / "reweight.json").read_text())
    assert saved["name"] == "learned" and set(saved["per_kind"]) == {
        "clean", "noise 0.2", "pgd 25.5/255"}
    assert len(json.loads((out / "oracle.json").read_text())["norms"]) == 36
    assert (out / "reweight.png").stat().st_size > 1000
    curve = build_reweight("learned", path=str(out))
    t = curve(torch.linspace(0, 1e3, 50))
    assert (t[1:] >= t[:-1]).all() and t.max() <= 0.3 + 1e-6
