import json

import pytest
import torch
import yaml

from ssni.attacks import PGD
from ssni.config import load_config
from ssni.defense import fixed_view
from ssni.evaluate import saved_cell
from ssni.evaluate.runner import AttackSpec, BoundSeeds, EvaluateConfig, Evaluation, expand_attacks
from ssni.io import atomic_save_safetensors, atomic_write_json
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.scoring import ScoreNormConfig, calibrate

STEP = {"eps": 0.1, "steps": 1, "step_size": 0.05}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A perturbed unet_tiny score model, its calibration and a resnet10t, on 8x8 digits."""
    root = tmp_path_factory.mktemp("evalplus")
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(root / "score", sm)
    from ssni.data import DataConfig, build_dataset

    train = build_dataset(DataConfig(image_size=8), "train")
    cal, _ = calibrate(sm.eval(), train.images[:32], ScoreNormConfig(timesteps=4), batch_size=32)
    cal.save(root / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    return root


def _config(root, run_dir, **over):
    rec = {
        "run_dir": str(run_dir), "data": {"name": "digits", "image_size": 8},
        "num_samples": 6, "batch_size": 3, "draws": 2, "progress": False, "device": "cpu",
        "defense": {"score_model": str(root / "score"), "score_weights": "model",
                    "calibration": str(root / "calibration.json"),
                    "score_norm": {"timesteps": 4},
                    "purifier": {"sampler": "ddpm", "steps": 1},
                    "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
                    "mean": [0.0], "std": [1.0], "device": "cpu"},
        "defenses": [{"name": "none"},
                     {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}}],
        "attacks": [{"name": "pgd", "attack": "pgd", "eot": 2, "kwargs": STEP},
                    {"name": "rand", "preset": "rand", "eot": 2, "kwargs": {"eps": 0.1, "steps": 1}}],
        "sweep": {},
    }
    rec.update(over)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return load_config(EvaluateConfig, path, [])


def test_rand_preset_expands_to_apgd_ce_and_dlr_with_eot_20():
    specs, groups = expand_attacks([AttackSpec(name="pgd"),
                                    AttackSpec(name="aa", preset="rand", kwargs={"eps": 0.5, "norm": "l2"})])
    assert [s.name for s in specs] == ["pgd", "aa-apgd-ce", "aa-apgd-dlr"]
    assert groups == {"aa": ["aa-apgd-ce", "aa-apgd-dlr"]}
    for s, loss in zip(specs[1:], ("ce", "dlr")):
        assert s.attack == "apgd" and s.eot == 20
        assert s.kwargs == {"steps": 100, "eps": 0.5, "norm": "l2", "loss": loss}


def test_majority_column_and_worst_case_rows(tiny_setup, tmp_path):
    Evaluation(_config(tiny_setup, tmp_path / "ev")).run()
    res = json.loads((tmp_path / "ev/results.json").read_text())
    assert [(r["defense"], r["attack"]) for r in res["rows"]] == [
        (d, a) for d in ("none", "dbp") for a in ("pgd", "rand-apgd-ce", "rand-apgd-dlr")]
    for r in res["rows"]:
        assert 0 <= r["majority"] <= 1 and r["majority_ci"][0] <= r["majority"] <= r["majority_ci"][1]
    state = tmp_path / "ev/state"
    wc = {(r["defense"], r["attack"]): r for r in res["worst_case"]}
    assert set(wc) == {(d, a) for d in ("none", "dbp") for a in ("rand", "worst-case")}
    for d in ("none", "dbp"):
        assert wc[(d, "rand")]["attacks"] == ["rand-apgd-ce", "rand-apgd-dlr"]
        assert wc[(d, "worst-case")]["attacks"] == ["pgd", "rand-apgd-ce", "rand-apgd-dlr"]
        # a sample counts only if every draw survives every attack (recomputed from the saved batches)
        per = [[row for b in saved_cell(tmp_path / "ev", f"{d}/{a}") for row in b["correct"]]
               for a in ("pgd", "rand-apgd-ce", "rand-apgd-dlr")]
        robust = [all(all(p[i]) for p in per) for i in range(6)]
        assert wc[(d, "worst-case")]["robust_worst"] == pytest.approx(sum(robust) / 6)
        mine = [r for r in res["rows"] if r["defense"] == d]
        assert wc[(d, "worst-case")]["robust_expected"] <= min(r["robust_expected"] for r in mine) + 1e-9
        assert wc[(d, "worst-case")]["majority"] <= min(r["majority"] for r in mine) + 1e-9
    report = (tmp_path / "ev/report.md").read_text()
    assert "robust % (majority)" in report and "| dbp | worst-case |" in report

    # batches saved before per-draw predictions were stored still load: no majority, same other numbers
    for p in state.rglob("batch_*.json"):
        b = json.loads(p.read_text())
        del b["pred"]
        p.write_text(json.dumps(b))
    Evaluation(_config(tiny_setup, tmp_path / "ev")).run()
    old = json.loads((tmp_path / "ev/results.json").read_text())
    assert all(r["majority"] is None for r in old["rows"] + old["worst_case"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "majority", "majority_ci")}  # noqa: E731
                        for r in rs]
    assert strip(old["rows"]) == strip(res["rows"]) and strip(old["worst_case"]) == strip(res["worst_case"])
    assert "| — |" in (tmp_path / "ev/report.md").read_text()


def test_selective_targeted_and_reserved_labels(tiny_setup, tmp_path):
    from ssni.config import ConfigError

    ev = Evaluation(_config(tiny_setup, tmp_path / "ev", attacks=[]))
    a = ev._make_attack(AttackSpec(name="s", eot=3, selective=True, kwargs=STEP))
    assert a.eot_selective and a.eot_samples == 3 and a.grad_fn.selective
    assert ev._make_attack(AttackSpec(name="t", kwargs={**STEP, "targeted": True})).targeted
    t = ev._targets(ev.y, "dbp/t", 0)
    assert (t != ev.y).all() and torch.equal(t, ev._targets(ev.y, "dbp/t", 0))
    with pytest.raises(ConfigError, match="reserved"):
        Evaluation(_config(tiny_setup, tmp_path / "bad", attacks=[{"name": "worst-case", "kwargs": STEP}]))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        Evaluation(_config(tiny_setup, tmp_path / "bad2", attacks=[{"name": "x", "preset": "nope"}]))


def test_targeted_attack_runs_in_an_evaluation(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "ev", defenses=[{"name": "none"}],
                  attacks=[{"name": "tgt", "attack": "pgd", "view": "bare", "kwargs": {**STEP, "targeted": True}}])
    Evaluation(cfg).run()
    rows = json.loads((tmp_path / "ev/results.json").read_text())["rows"]
    assert [r["attack"] for r in rows] == ["tgt"] and 0 <= rows[0]["robust_expected"] <= 1


def test_fixed_view_is_the_defense_and_the_attack_wins_draw_0(tiny_setup, tmp_path):
    ev = Evaluation(_config(tiny_setup, tmp_path / "ev", attacks=[]))
    model, x = ev.defenses["dbp"], ev.x
    seeds = [ev._seeds("dbp/fixed", 0, x.shape[0], m) for m in range(4)]
    view = BoundSeeds(fixed_view(model), seeds[0])
    with torch.no_grad():
        y0 = model(x, seeds=seeds[0]).argmax(1)  # labels the clean draw 0 gets right by construction
        assert torch.allclose(view(x), model(x, seeds=seeds[0]), atol=1e-5)
        assert torch.allclose(view(x.repeat(2, 1, 1, 1))[:6], view(x), atol=1e-5)  # EOT copies share seeds
    x_adv = PGD(eps=0.3, steps=8, step_size=0.08)(view, x, y0, seed=0)
    with torch.no_grad():
        fooled = [(model(x_adv, seeds=s).argmax(1) != y0).float().mean().item() for s in seeds]
    assert fooled[0] > 0 and fooled[0] >= max(fooled[1:])


def test_fixed_view_evaluation_resumes_and_saves_adversarials(tiny_setup, tmp_path):
    over = {"defenses": [{"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}}],
            "attacks": [{"name": "fixed", "attack": "pgd", "fixed_seeds": True, "kwargs": STEP}],
            "save_adversarial": True}
    Evaluation(_config(tiny_setup, tmp_path / "full", **over)).run()
    with pytest.raises(KeyboardInterrupt):
        Evaluation(_config(tiny_setup, tmp_path / "part", **over), stop_after_batches=3).run()
    Evaluation(_config(tiny_setup, tmp_path / "part", **over)).run()
    a = json.loads((tmp_path / "full/results.json").read_text())
    b = json.loads((tmp_path / "part/results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(a["rows"]) == strip(b["rows"])
    # the bound seeds make the attacked view deterministic: no "randomized without EOT" flag
    assert not any("EOT" in f for f in a["flags"])
    from ssni.evaluate import saved_adversarial

    saved = saved_adversarial(tmp_path / "part", "dbp/fixed")
    assert len(saved) == 2 and torch.equal(saved[1]["y"], Evaluation(_config(tiny_setup, tmp_path / "part", **over)).y[3:])
    adv = saved[0]
    ev = Evaluation(_config(tiny_setup, tmp_path / "part", **over))
    assert adv["x_adv"].shape == (3, 1, 8, 8) and (adv["x_adv"] - ev.x[:3]).abs().max() <= 0.1 + 1e-6


def _attack_purifiers(ev, spec_purifier):
    """The purifier the attack views of `dbp` differentiate for an attack with `purifier: spec_purifier`."""
    spec = AttackSpec(name="x", attack="pgd", kwargs=STEP, purifier=spec_purifier)
    model = ev.defenses["dbp"]
    return model.view(spec.view_spec()).purifier, model


def test_attacks_differentiate_the_defense_purifier_unless_a_surrogate_is_chosen(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "ev", draws=6, attacks=[
        {"name": "own", "attack": "pgd", "eot": 2, "kwargs": STEP},
        {"name": "cheap", "attack": "pgd", "eot": 2, "kwargs": STEP, "purifier": "surrogate"}])
    cfg.defense.purifier.steps = 2
    cfg.defense.attack_purifier = type(cfg.defense.purifier)(sampler="ddim", steps=1)
    ev = Evaluation(cfg)
    own, model = _attack_purifiers(ev, "defense")
    assert own is model.purifier
    cheap, _ = _attack_purifiers(ev, "surrogate")
    assert cheap is model.attack_purifier and cheap is not model.purifier
    assert ev.budgets["own"] == "pgd ce, 1 it, EOT 2, through defense purifier ddpm(steps=2, clip=True)"
    assert ev.budgets["cheap"] == "pgd ce, 1 it, EOT 2, through surrogate purifier ddim(steps=1, clip=True)"
    ev.run()
    report = (tmp_path / "ev/report.md").read_text()
    res = json.loads((tmp_path / "ev/results.json").read_text())
    for r in res["rows"] + res["worst_case"]:
        assert r["budget"] and f"| {r['budget']} |" in report
        if r["defense"] == "none" and r in res["rows"]:  # the undefended classifier has no purifier
            assert r["budget"] == "pgd ce, 1 it, EOT 2, no purifier (bare classifier)"
        # six draws: worst-of-4 over the first four draws beside worst-of-6, which can only be lower
        assert r["worst_k"] == 4 and r["robust_worst"] <= r["robust_worst_k"]
    assert "robust % (worst-of-4)" in report and "robust % (worst-of-6)" in report


def test_a_surrogate_attack_without_an_attack_purifier_is_a_one_line_error(tiny_setup, tmp_path):
    from ssni.config import ConfigError

    cfg = _config(tiny_setup, tmp_path / "ev", attacks=[
        {"name": "cheap", "attack": "pgd", "kwargs": STEP, "purifier": "surrogate"}])
    with pytest.raises(ConfigError, match="purifier: surrogate needs an attack_purifier"):
        Evaluation(cfg)
    cfg.attacks[0].purifier = "cheap"
    with pytest.raises(ConfigError, match="purifier must be one of defense, surrogate"):
        Evaluation(cfg)


def test_per_step_attacks_run_in_evaluate_also_with_fixed_seeds(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "ev", defenses=[
        {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}}], attacks=[
        {"name": "step", "attack": "pgd", "eot": 2, "kwargs": STEP, "per_step": True},
        {"name": "step-fixed", "attack": "pgd", "kwargs": STEP, "per_step": True, "fixed_seeds": True}])
    cfg.defense.purifier.steps = 2
    ev = Evaluation(cfg)
    assert ev._make_attack(ev.attacks[0]).per_step and "loss at every step" in ev.budgets["step"]
    res = ev.run()
    rows = json.loads((tmp_path / "ev/results.json").read_text())["rows"]
    assert [r["attack"] for r in rows] == ["step", "step-fixed"] and not res["flags"]


def test_paired_differences_against_a_defense_match_the_saved_draws(tiny_setup, tmp_path):
    from ssni.config import ConfigError
    from ssni.evaluate.metrics import paired_difference

    out = tmp_path / "ev"
    setup = dict(draws=3, defenses=[
        {"name": "none"}, {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}},
        {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05, "b": 0.005}}}],
        attacks=[{"name": "pgd", "attack": "pgd", "eot": 2, "kwargs": STEP},
                 {"name": "adaptive", "attack": "pgd", "view": "adaptive", "only_sample_specific": True,
                  "kwargs": STEP}])
    Evaluation(_config(tiny_setup, out, paired_with="dbp", **setup)).run()
    res = json.loads((out / "results.json").read_text())

    def per_image(cell):
        return torch.tensor([row for b in saved_cell(out, cell) for row in b["correct"]]).float().mean(1)
    got = {(p["defense"], p["what"]): p for p in res["paired"]}
    # none and ssni-n against dbp: clean, pgd (both faced it) and worst-case; adaptive ran on ssni-n only
    assert set(got) == {(d, w) for d in ("none", "ssni-n") for w in ("clean", "pgd", "worst-case")}
    for d in ("none", "ssni-n"):
        for what, cell in (("clean", "clean"), ("pgd", "pgd")):
            want = paired_difference(per_image(f"{d}/{cell}"), per_image(f"dbp/{cell}"))
            assert got[(d, what)]["diff"] == pytest.approx(want["diff"])
            lo, hi = got[(d, what)]["ci"]
            assert lo <= got[(d, what)]["diff"] <= hi
    # ssni-n's worst case is over its own two attacks: per image the lower of the two
    worst = torch.minimum(per_image("ssni-n/pgd"), per_image("ssni-n/adaptive"))
    assert got[("ssni-n", "worst-case")]["diff"] == pytest.approx((worst - per_image("dbp/pgd")).mean().item())
    report = (out / "report.md").read_text()
    assert "## Paired differences against dbp" in report and "| ssni-n |" in report
    # a reporting choice: changing it later reuses every finished batch
    assert Evaluation(_config(tiny_setup, out, paired_with="none", **setup)).run()["computed_batches"] == 0
    with pytest.raises(ConfigError, match="paired_with 'dpb' is not one of the defenses"):
        Evaluation(_config(tiny_setup, tmp_path / "bad", paired_with="dpb"))


def test_paired_difference_interval_and_bad_shapes():
    from ssni.evaluate.metrics import paired_difference

    a = torch.tensor([1.0, 0.5, 0.0, 0.0, 1.0, 0.0])
    r = paired_difference(a, a)
    assert r["diff"] == 0.0 and r["ci"] == (0.0, 0.0)  # identical defenses: no difference, no spread
    b = torch.zeros(6)
    r = paired_difference(a, b)
    sd = (a - b).std().item()
    assert r["diff"] == pytest.approx(a.mean().item())
    assert r["ci"][1] - r["ci"][0] == pytest.approx(2 * 1.959964 * sd / 6 ** 0.5, rel=1e-5)  # not clipped here
    assert paired_difference(torch.ones(6), torch.tensor([1.0, 0, 0, 0, 0, 0]))["ci"][1] == 1.0  # clipped to 1
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, b[:5])


def test_eot_max_batch_splits_the_copies_and_keeps_the_results_and_the_state(tiny_setup, tmp_path):
    """eot_max_batch caps the rows of one EOT call (memory), changes no result, so a run directory
    written without it resumes with it."""
    setup = {"attacks": [{"name": "pgd", "attack": "pgd", "eot": 4, "kwargs": STEP}],
             "defenses": [{"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}}]}
    whole = Evaluation(_config(tiny_setup, tmp_path / "whole", **setup))
    split = Evaluation(_config(tiny_setup, tmp_path / "split", eot_max_batch=3, **setup))  # 3 images: 1 copy a call
    assert whole._make_attack(whole.attacks[0]).grad_fn.max_batch == 4096
    assert split._make_attack(split.attacks[0]).grad_fn.max_batch == 3
    whole.run()
    split.run()

    def saved(run):  # every draw's prediction of every attacked image, batch by batch
        return [b["pred"] for b in saved_cell(tmp_path / run, "dbp/pgd")]

    assert len(saved("whole")) == 2 and saved("whole") == saved("split")
    again = Evaluation(_config(tiny_setup, tmp_path / "whole", eot_max_batch=3, **setup)).run()
    assert again["computed_batches"] == 0 and again["reused_batches"] > 0
