"""The `autoattack` attack: pyautoattack's AutoAttack run on a module or a defense view, with its own
seed and EOT, in `ssni evaluate` like the other attacks. Tests that run AutoAttack need the optional
extra `ssni[autoattack]`: without it they are skipped, and with CI=true they fail (CI installs it)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ssni.attacks import ATTACKS, EOT, AutoAttackClient, per_step
from ssni.config import ConfigError
from ssni.data import DataConfig, build_dataset
from ssni.evaluate.runner import Evaluation

sys.path.insert(0, str(Path(__file__).parent))  # fixtures and helpers of other test files
from test_evaluate_plus import _config, tiny_setup  # noqa: E402,F401  (tiny_setup: a fixture)
from test_lownoise import defense  # noqa: E402,F401  (a fixture: the tiny SSNI-N defense on digits)


@pytest.fixture(scope="module")
def digits_linear():
    """(a linear classifier on 8x8 digits, 8 test images, labels) -- undefended, trained in a second."""
    cfg = DataConfig(name="digits", image_size=8)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(train.images), train.labels).backward()
        opt.step()
    return net.eval().requires_grad_(False), test.images[:8], test.labels[:8]


def _acc(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def test_standard_version_on_an_undefended_classifier_is_the_package_run_repeatably(extra, digits_linear):
    pyautoattack = extra("pyautoattack", "autoattack")
    net, x, y = digits_linear
    attack = AutoAttackClient(eps=0.3, version="standard", n_iter=5, n_queries=20)
    assert attack.budget_head() == "standard (apgd-ce, apgd-t, fab-t, square), 5 it, square 20 queries, EOT 1 " \
                                   "(AutoAttack's own)"
    torch.manual_seed(1)
    x_adv = attack(net, x, y, seed=0)
    after = torch.rand(3)  # the caller's RNG is left where it was, whatever AutoAttack reseeds
    torch.manual_seed(1)
    torch.testing.assert_close(torch.rand(3), after)
    clean, robust = _acc(net, x, y), _acc(net, x_adv, y)
    assert clean >= 0.75 and robust <= clean and robust < clean  # eps 0.3 breaks a linear digit classifier
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(attack(net, x, y, seed=0), x_adv)  # same seed, same images
    # it is pyautoattack's run: the package itself, seeded as the attack seeds it, gives the same images
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=torch.Generator().manual_seed(0)))
    aa = attack.build(net, x.device, seed)
    assert isinstance(aa, pyautoattack.AutoAttack) and aa.apgd.n_iter == 5 and aa.square.n_queries == 20
    torch.testing.assert_close(aa.run_standard_evaluation(x, y, batch_size=8)[0], x_adv)


def test_rand_version_on_a_defense_view_with_its_own_eot(extra, defense):  # noqa: F811
    extra("pyautoattack", "autoattack")
    d, x, y = defense
    attack = ATTACKS.create("autoattack", eps=0.05, version="rand", n_iter=3, eot_iter=2)
    assert attack.eot_samples == 2 and attack.describe()["attacks"] == ["apgd-ce", "apgd-dlr"]
    view = d.view("full")
    x_adv = attack(view, x[:4], y[:4], seed=1)
    assert (x_adv - x[:4]).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(attack(view, x[:4], y[:4], seed=1), x_adv)  # the view's draws follow AutoAttack's seed
    with pytest.raises(ValueError, match="EOT cannot wrap AutoAttackClient: .*own EOT"):
        EOT(attack, 2)
    with pytest.raises(ValueError, match="per_step cannot wrap AutoAttackClient"):
        per_step(attack)


AA = {"name": "aa", "attack": "autoattack", "kwargs": {"eps": 0.1, "version": "rand", "n_iter": 2, "eot_iter": 2}}


def test_autoattack_in_an_evaluation_rows_flags_and_resume(extra, tiny_setup, tmp_path):  # noqa: F811
    extra("pyautoattack", "autoattack")
    std = {"name": "aa-std", "attack": "autoattack",
           "kwargs": {"eps": 0.1, "version": "custom", "attacks": ["apgd-ce"], "n_iter": 2}}
    ev = Evaluation(_config(tiny_setup, tmp_path / "full", attacks=[AA, std]))
    assert ev.budgets["aa"] == ("autoattack rand (apgd-ce, apgd-dlr), 2 it, EOT 2 (AutoAttack's own), through "
                                "defense purifier ddpm(steps=1, clip=True)")
    assert ev.bare_budgets["aa"].endswith("no purifier (bare classifier)")
    ev.run()
    res = json.loads((tmp_path / "full/results.json").read_text())
    assert [(r["defense"], r["attack"]) for r in res["rows"]] == [(d, a) for d in ("none", "dbp") for a in ("aa", "aa-std")]
    rows = {(r["defense"], r["attack"]): r for r in res["rows"]}
    assert all(rows[("none", a)]["robust_expected"] <= rows[("none", a)]["clean"] for a in ("aa", "aa-std"))
    assert {r["defense"]: r["attacks"] for r in res["worst_case"]} == {"none": ["aa", "aa-std"], "dbp": ["aa", "aa-std"]}
    # its own EOT counts in the randomness self-check: only the version without EOT is flagged on the random view
    assert rows[("dbp", "aa-std")]["flags"] == ["aa-std: the defense is randomized but the attack uses no EOT (eot=1)"]
    assert rows[("dbp", "aa")]["flags"] == [] and rows[("none", "aa-std")]["flags"] == []
    # stopped after its first attacked batch and resumed: the same row (same cell, same seeds)
    part = _config(tiny_setup, tmp_path / "part", attacks=[AA], defenses=[{"name": "dbp", "reweight": {
        "name": "constant", "kwargs": {"t_base": 0.05}}}])
    with pytest.raises(KeyboardInterrupt):
        Evaluation(part, stop_after_batches=3).run()
    Evaluation(part).run()
    again = json.loads((tmp_path / "part/results.json").read_text())["rows"]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in again] == [strip(rows[("dbp", "aa")])]


def test_specs_that_cannot_work_are_one_line_errors(extra, tiny_setup, tmp_path):  # noqa: F811
    extra("pyautoattack", "autoattack")
    for bad, match in (({"eot": 2}, "EOT cannot wrap AutoAttackClient"), ({"selective": True}, "EOT cannot wrap"),
                       ({"per_step": True}, "per_step cannot wrap"), ({"fixed_seeds": True}, "cannot attack with fixed"),
                       ({"kwargs": {"version": "custom", "attacks": ["apgd-x"]}}, "unknown attack 'apgd-x'")):
        with pytest.raises(ConfigError, match=match):
            Evaluation(_config(tiny_setup, tmp_path / "bad", attacks=[{**AA, **bad}]))


def test_bad_settings_fail_in_one_line_without_the_package():
    for kw, match in (({"version": "fast"}, "version must be one of standard, plus, rand, custom"),
                      ({"version": "custom"}, "list `attacks` exactly with version custom"),
                      ({"attacks": ["apgd-ce"]}, "list `attacks` exactly with version custom"),
                      ({"n_iter": 0}, "n_iter must be >= 1"), ({"targeted": True}, "untargeted")):
        with pytest.raises(ValueError, match=match):
            AutoAttackClient(**kw)


def test_missing_extra_names_the_install_and_a_broken_one_shows_its_error(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"^the autoattack attack needs the optional extra: "
                                          r"pip install 'ssni\[autoattack\]'$"):
        AutoAttackClient()
    with pytest.raises(ConfigError, match=r"attacks\[0\] \('aa'\): the autoattack attack needs .*ssni\[autoattack\]"):
        Evaluation(_config(tiny_setup, tmp_path / "ev", attacks=[AA]))
    # installed but broken: its own import error comes through
    broken = tmp_path / "site" / "pyautoattack"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import a_dependency_that_is_not_there\n")
    monkeypatch.delitem(sys.modules, "pyautoattack")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ImportError, match="pyautoattack is installed but does not import: ModuleNotFoundError: "
                                          "No module named 'a_dependency_that_is_not_there'"):
        AutoAttackClient()
