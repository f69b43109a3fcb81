import json

import pytest
import torch
import yaml

from ssni.config import load_config
from ssni.evaluate import config_fingerprint, saved_adversarial, saved_cell
from ssni.evaluate.runner import EvaluateConfig, Evaluation
from ssni.evaluate.state import slug
from ssni.io import atomic_save_safetensors, atomic_write_json
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.scoring import ScoreNormConfig, calibrate


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A perturbed unet_tiny score model, its calibration and a resnet10t, on 8x8 digits."""
    root = tmp_path_factory.mktemp("eval")
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
                    "purifier": {"sampler": "ddpm", "steps": 2},
                    "attack_purifier": {"sampler": "ddpm", "steps": 1},
                    "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
                    "mean": [0.0], "std": [1.0], "device": "cpu"},
        "defenses": [{"name": "none"},
                     {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}},
                     {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}],
        "attacks": [{"name": "pgd-eot", "attack": "pgd", "eot": 2, "view": "full",
                     "kwargs": {"eps": 0.1, "steps": 2, "step_size": 0.05}},
                    {"name": "adaptive", "attack": "pgd", "eot": 2, "view": "adaptive",
                     "only_sample_specific": True,
                     "kwargs": {"eps": 0.1, "steps": 2, "step_size": 0.05}}],
        "sweep": {"attack": "pgd-eot", "defenses": ["dbp"], "eps": [0.0, 0.5], "num_samples": 3,
                  "huge_eps": 0.4},
    }
    rec.update(over)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return load_config(EvaluateConfig, path, [])


def test_evaluation_end_to_end_and_resume_equals_uninterrupted(tiny_setup, tmp_path):
    full_cfg = _config(tiny_setup, tmp_path / "full")
    Evaluation(full_cfg).run()
    rows = json.loads((tmp_path / "full/results.json").read_text())["rows"]
    cells = {(r["defense"], r["attack"]) for r in rows}
    # the adaptive attack runs only where t* depends on the input
    assert cells == {("none", "pgd-eot"), ("dbp", "pgd-eot"), ("ssni-n", "pgd-eot"),
                     ("ssni-n", "adaptive")}
    for r in rows:
        assert r["n"] == 6 and r["draws"] == 2
        assert 0 <= r["robust_worst"] <= r["robust_expected"] <= 1
    ssni = next(r for r in rows if r["defense"] == "ssni-n")
    assert ssni["mean_t_clean"] is not None and 0 < ssni["mean_t_clean"] <= 0.06
    assert (tmp_path / "full/report.md").is_file() and (tmp_path / "full/t_star.png").is_file()
    assert (tmp_path / "full/accuracy_vs_eps.png").is_file()
    # the sweep's n (3) is not the table's (6): the report says so beside the plot
    assert "`pgd-eot` on the first 3 of the 6 images" in (tmp_path / "full/report.md").read_text()

    # killed after 5 finished batches, then started again: same numbers, nothing redone
    part_cfg = _config(tiny_setup, tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        Evaluation(part_cfg, stop_after_batches=5).run()
    saved = sorted((tmp_path / "part/state").rglob("batch_*.json"))
    assert len(saved) == 5
    before = {p: p.stat().st_mtime_ns for p in saved}
    Evaluation(part_cfg).run()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    a = json.loads((tmp_path / "full/results.json").read_text())
    b = json.loads((tmp_path / "part/results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(a["rows"]) == strip(b["rows"])
    assert a["per_sample"] == b["per_sample"]


def test_changed_config_in_same_run_dir_is_refused(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "r", defenses=[{"name": "none"}], attacks=[],
                  sweep={})
    Evaluation(cfg).run()
    cfg2 = _config(tiny_setup, tmp_path / "r", defenses=[{"name": "none"}], attacks=[],
                   sweep={}, draws=3)
    with pytest.raises(ValueError, match="different evaluation config"):
        Evaluation(cfg2)


_PGD = {"name": "pgd-eot", "attack": "pgd", "eot": 2, "view": "full", "kwargs": {"eps": 0.1, "steps": 1, "step_size": 0.05}}
_DBP = {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.05}}}


def _mtimes(run):
    return {p: p.stat().st_mtime_ns for p in (run / "state").rglob("batch_*.json")}


def test_a_study_grows_by_a_defense_and_an_attack_and_keeps_every_finished_cell(tiny_setup, tmp_path):
    run = tmp_path / "r"
    first = Evaluation(_config(tiny_setup, run, defenses=[{"name": "none"}, _DBP], attacks=[_PGD], sweep={})).run()
    assert first["computed_batches"] == 8  # 2 defenses x (clean + pgd-eot) x 2 batches
    before, rows_before = _mtimes(run), json.loads((run / "results.json").read_text())["rows"]
    more = dict(_PGD, name="pgd-2", kwargs=dict(_PGD["kwargs"], steps=2))
    ssni = {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}}
    grown = Evaluation(_config(tiny_setup, run, defenses=[{"name": "none"}, _DBP, ssni], attacks=[_PGD, more],
                               sweep={})).run()
    # only the new cells ran: none/pgd-2, dbp/pgd-2 and ssni-n's clean, pgd-eot and pgd-2, 2 batches each
    assert grown["reused_batches"] == 8 and grown["computed_batches"] == 10
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    rows = {(r["defense"], r["attack"]): r for r in json.loads((run / "results.json").read_text())["rows"]}
    for r in rows_before:
        assert {k: v for k, v in rows[(r["defense"], r["attack"])].items() if k != "seconds"} == \
            {k: v for k, v in r.items() if k != "seconds"}
    assert ("ssni-n", "pgd-2") in rows


def test_a_changed_attack_recomputes_its_own_cells_and_keeps_the_old_ones(tiny_setup, tmp_path):
    run = tmp_path / "r"
    Evaluation(_config(tiny_setup, run, defenses=[_DBP], attacks=[_PGD], sweep={})).run()
    old = saved_cell(run, "dbp/pgd-eot")
    harder = dict(_PGD, kwargs=dict(_PGD["kwargs"], steps=3))  # same name, another budget
    again = Evaluation(_config(tiny_setup, run, defenses=[_DBP], attacks=[harder], sweep={})).run()
    assert again["reused_batches"] == 2 and again["computed_batches"] == 2  # clean reused, the attack redone
    assert len(list((run / "state" / "dbp_pgd-eot").iterdir())) == 2  # both budgets' results are kept
    back = Evaluation(_config(tiny_setup, run, defenses=[_DBP], attacks=[_PGD], sweep={})).run()
    assert back["computed_batches"] == 0 and saved_cell(run, "dbp/pgd-eot") == old


def test_an_attack_limited_to_some_defenses_runs_on_those_only(tiny_setup, tmp_path):
    from ssni.config import ConfigError

    only = dict(_PGD, name="pgd-dbp", defenses=["dbp"])
    Evaluation(_config(tiny_setup, tmp_path / "r", defenses=[{"name": "none"}, _DBP], attacks=[_PGD, only],
                       sweep={})).run()
    cells = {(r["defense"], r["attack"]) for r in json.loads((tmp_path / "r" / "results.json").read_text())["rows"]}
    assert cells == {("none", "pgd-eot"), ("dbp", "pgd-eot"), ("dbp", "pgd-dbp")}
    with pytest.raises(ConfigError, match=r"attacks\[1\] \('pgd-dbp'\): defenses \['dpb'\] must name some of "
                                          r"the defenses \['none', 'dbp'\]; unknown: \['dpb'\]"):
        Evaluation(_config(tiny_setup, tmp_path / "bad", defenses=[{"name": "none"}, _DBP],
                           attacks=[_PGD, dict(only, defenses=["dpb"])], sweep={}))
    # widening who faces it runs the new defense's cell only: the finished one is reused
    wider = Evaluation(_config(tiny_setup, tmp_path / "r", defenses=[{"name": "none"}, _DBP],
                               attacks=[_PGD, dict(only, defenses=["dbp", "none"])], sweep={})).run()
    assert wider["computed_batches"] == 2 and wider["reused_batches"] == 10  # 5 finished cells x 2 batches
    # filters that leave an attack no defense at all: refused, not silently skipped
    with pytest.raises(ConfigError, match=r"attacks\[1\] \('pgd-dbp'\) faces none of the defenses \['none', 'dbp'\]"):
        Evaluation(_config(tiny_setup, tmp_path / "none", defenses=[{"name": "none"}, _DBP], sweep={},
                           attacks=[_PGD, dict(only, only_sample_specific=True)]))


def test_sweep_epsilons_that_print_alike_are_refused(tiny_setup, tmp_path):
    from ssni.config import ConfigError

    sweep = {"attack": "pgd-eot", "defenses": ["dbp"], "eps": [0.1, 0.5, 0.5000001], "num_samples": 3}
    with pytest.raises(ConfigError, match=r"sweep.eps .* print alike \(\['0.1', '0.5', '0.5'\]\)"):
        Evaluation(_config(tiny_setup, tmp_path / "ev", sweep=sweep))


def test_a_state_in_the_whole_config_layout_resumes_after_moving_into_cells(tiny_setup, tmp_path):
    # the layout evaluations wrote before cells had keys: state/<cell>/batch_XXXXX.json under one
    # fingerprint of the whole config (also checked on a real 18-cell run: reused 18, computed 0)
    run = tmp_path / "r"
    cfg = _config(tiny_setup, run, sweep={}, save_adversarial=True)
    Evaluation(cfg).run()
    want = json.loads((run / "results.json").read_text())
    ev = Evaluation(cfg)
    legacy = ev._legacy_fingerprints(ev.base_cfg)
    for cell, key in ev.cell_keys.items():
        for folder in (run / "state" / slug(cell), run / "adv" / slug(cell)):
            if (folder / key).is_dir():
                for p in (folder / key).iterdir():
                    p.replace(folder / p.name)
                (folder / key).rmdir()
    assert len(saved_adversarial(run, "ssni-n/adaptive")) == 2  # the legacy layout's loose images are read too
    atomic_write_json(run / "state" / "fingerprint.json", {"fingerprint": config_fingerprint(legacy), "parts": legacy})
    # another config on that legacy state is refused (its cells cannot be told apart), nothing moved
    with pytest.raises(ValueError, match=r"different evaluation config or inputs \(changed: config\), "
                                         "saved before each cell had its own key.* run once with the config"):
        Evaluation(_config(tiny_setup, run, sweep={}, attacks=[_PGD]))
    assert (run / "state" / "dbp_clean" / "batch_00000.json").is_file()
    again = Evaluation(cfg).run()
    assert again["computed_batches"] == 0 and again["reused_batches"] == 14
    got = json.loads((run / "results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(got["rows"]) == strip(want["rows"]) and got["per_sample"] == want["per_sample"]
    assert json.loads((run / "state" / "fingerprint.json").read_text())["parts"]["layout"] == "cell-keys"
    key = ev.cell_keys["ssni-n/adaptive"]  # the adversarial images moved with their cell
    assert sorted(p.name for p in (run / "adv" / "ssni-n_adaptive" / key).iterdir()) == \
        ["batch_00000.safetensors", "batch_00001.safetensors"]
    first = saved_adversarial(run, "ssni-n/adaptive")[0]["x_adv"]
    # a cell begun by the older code and finished by this one: its first batch loose, the rest under the key
    (run / "adv" / "ssni-n_adaptive" / key / "batch_00000.safetensors").replace(
        run / "adv" / "ssni-n_adaptive" / "batch_00000.safetensors")
    both = saved_adversarial(run, "ssni-n/adaptive")
    assert len(both) == 2 and torch.equal(both[0]["x_adv"], first)


def test_sweep_reuses_the_main_cell_at_the_attacks_own_epsilon(tiny_setup, tmp_path):
    sweep = {"attack": "pgd-eot", "defenses": ["dbp"], "eps": [0.1, 0.5], "num_samples": 3,
             "huge_eps": 0.4}
    cfg = _config(tiny_setup, tmp_path / "ev", sweep=sweep)
    Evaluation(cfg).run()
    state = tmp_path / "ev/state"
    # only the new epsilon was attacked again; 0.1 is the main pgd-eot cell's first batch
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("sweep")) == ["sweep_dbp_0.5"]
    first = saved_cell(tmp_path / "ev", "dbp/pgd-eot")[0]["correct"]
    expected = sum(sum(r) for r in first) / (3 * 2)
    curves = json.loads((tmp_path / "ev/results.json").read_text())["curves"]
    assert curves["dbp"]["acc"][0] == pytest.approx(expected)


def test_sweep_scales_the_step_size_with_epsilon(tiny_setup, tmp_path):
    ev = Evaluation(_config(tiny_setup, tmp_path / "ev"))
    spec = ev.cfg.attacks[0]  # eps 0.1, step 0.05, EOT 2
    assert ev._make_attack(spec).step_size == pytest.approx(0.05)
    assert ev._make_attack(spec, eps=0.5).step_size == pytest.approx(0.25)
    assert ev._make_attack(spec, eps=0.5).eps == pytest.approx(0.5)
    ev.cfg.sweep.scale_step = False
    assert ev._make_attack(spec, eps=0.5).step_size == pytest.approx(0.05)


def test_histogram_bins_cover_every_group_and_survive_equal_values():
    from ssni.evaluate.report import _shared_bins

    b = _shared_bins([0.02, 0.05, 0.105, 0.105], n=10)
    assert len(b) == 11 and b[0] == 0.02 and b[-1] == pytest.approx(0.105)
    b = _shared_bins([0.105] * 5)  # a saturated reweight: every t* the same
    assert b[0] < 0.105 < b[-1] and b[-1] - b[0] == pytest.approx(2 * 0.01 * 0.105)
