"""tools/fmnist_results.py on evaluations run for real on tiny networks: what it copies, draws and says."""

import pytest
from conftest import load_tool
from test_evaluate_plus import STEP, _config, tiny_setup  # noqa: F401  (the module fixture)

from ssni.evaluate.runner import Evaluation


def _tool():
    return load_tool("fmnist_results")


def _constant(t):
    return {"name": f"dbp-{t}", "reweight": {"name": "constant", "kwargs": {"t_base": t}}}


def test_the_collector_reports_finished_stages_and_only_those(tiny_setup, tmp_path):  # noqa: F811
    runs, out = tmp_path / "runs", tmp_path / "results"
    runs.mkdir()
    Evaluation(_config(tiny_setup, runs / "dbp-tstar", defenses=[{"name": "none"}, _constant(0.02), _constant(0.1)],
                       attacks=[{"name": "pgd-eot", "attack": "pgd", "eot": 2, "kwargs": STEP}])).run()
    conv = [{"name": "pgd-10x2", "attack": "pgd", "eot": 2, "kwargs": STEP},
            {"name": "pgd-20x2", "attack": "pgd", "eot": 2, "kwargs": {**STEP, "steps": 2}},
            {"name": "pgd-10x4", "attack": "pgd", "eot": 4, "kwargs": STEP}]
    Evaluation(_config(tiny_setup, runs / "convergence", defenses=[_constant(0.05)], attacks=conv)).run()
    # an evaluation stopped after its first batch: not finished, and no table is taken from it
    with pytest.raises(KeyboardInterrupt):
        Evaluation(_config(tiny_setup, runs / "eval", attacks=conv[:1]), stop_after_batches=1).run()
    assert _tool().main(["--runs", str(runs), "--out", str(out)]) == 0
    # a finished evaluation with its adversarial images saved: a grid of them, one row per attacked cell
    done = tmp_path / "runs2"
    done.mkdir()
    Evaluation(_config(tiny_setup, done / "eval", attacks=conv[:1], save_adversarial=True)).run()
    assert _tool().main(["--runs", str(done), "--out", str(out / "done")]) == 0
    assert (out / "done" / "eval" / "adversarial_examples.png").stat().st_size > 1000
    assert "eval/adversarial_examples.png" in (out / "done" / "summary.md").read_text()
    summary = (out / "summary.md").read_text()
    res = __import__("json").loads((out / "dbp-tstar" / "results.json").read_text())
    rows = {r["defense"]: r for r in res["rows"]}
    best = max((0.02, 0.1), key=lambda t: (round(rows[f"dbp-{t}"]["robust_expected"], 6), rows[f"dbp-{t}"]["clean"]))
    assert f"Chosen t* (best robust, ties: higher clean): **{best:g}**" in summary
    assert (out / "dbp_tstar.png").stat().st_size > 1000 and (out / "convergence.png").stat().st_size > 1000
    assert "| dbp-0.05 / pgd |" in summary  # the convergence table: one line per defense and attack family
    assert "## eval\n\nNot finished (1 batches saved so far)." in summary and not (out / "eval").exists()
    assert "## reweight\n\nNot run yet." in summary
