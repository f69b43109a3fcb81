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
    # its differences are paired over the same images, from the run's per-image state: the mean
    # difference equals the difference of the two accuracies, and it carries an interval
    conv_rows = {r["attack"]: r for r in __import__("json").loads(
        (runs / "convergence" / "results.json").read_text())["rows"] if r["robust_expected"] is not None}
    for budget in ("20x2", "10x4"):
        line = next(x for x in summary.splitlines() if x.startswith(f"| dbp-0.05 / pgd | 10x2 -> {budget} |"))
        cell = line.strip("|").split("|")[2].strip()
        diff = 100 * (conv_rows[f"pgd-{budget}"]["robust_expected"] - conv_rows["pgd-10x2"]["robust_expected"])
        assert cell.startswith(f"{diff:+.1f} [") and cell.endswith("]"), (cell, diff)
        lo, hi = (float(v) for v in cell[cell.index("[") + 1:-1].split(","))
        assert lo <= diff + 0.05 and diff - 0.05 <= hi
    assert "| dbp-0.05 / pgd | 20x2 -> 10x4 |" not in summary  # not a doubling of one factor
    assert "## eval\n\nNot finished (1 batches saved so far)." in summary and not (out / "eval").exists()
    # and which cell that batch belongs to: the first defense's clean cell
    assert "\n- `none_clean/" in summary.split("## eval\n")[1].split("##")[0]
    # a finished stage whose recipe grows runs again in its folder: until it finishes, its old report
    # is not shown as the stage's result
    more = conv + [{"name": "pgd-40x2", "attack": "pgd", "eot": 2, "defenses": ["dbp-0.05"],
                    "kwargs": {**STEP, "steps": 3}}]
    with pytest.raises(KeyboardInterrupt):
        Evaluation(_config(tiny_setup, runs / "convergence", defenses=[_constant(0.05)], attacks=more),
                   stop_after_batches=1).run()
    assert _tool().main(["--runs", str(runs), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "summary.md").read_text()
    assert "## convergence\n\nNot finished" in again and "- `dbp-0.05_pgd-40x2/" in again
    assert "## reweight\n\nNot run yet." in summary


def test_the_headline_table_comes_from_the_evaluation_rows_and_pairs(tiny_setup, tmp_path):  # noqa: F811
    attacks = [{"name": "pgd-eot", "attack": "pgd", "eot": 2, "kwargs": STEP},
               {"name": "pgd-2", "attack": "pgd", "eot": 2, "kwargs": {**STEP, "steps": 2}}]
    defenses = [{"name": "none"}, _constant(0.05),
                {"name": "ssni-n", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05, "b": 0.005}}}]
    Evaluation(_config(tiny_setup, tmp_path / "eval", defenses=defenses, attacks=attacks, draws=4,
                             paired_with="dbp-0.05")).run()
    res = __import__("json").loads((tmp_path / "eval" / "results.json").read_text())
    # the tiny untrained classifier gives every cell the same accuracy: make each value distinct, so a
    # value taken from the wrong row or column shows
    for i, r in enumerate(res["rows"] + res["worst_case"]):
        for j, key in enumerate(("clean", "robust_expected", "robust_worst")):
            r[key] = (3 * i + j + 1) / 100
    for i, p in enumerate(res["paired"]):
        p["diff"] = (i + 1) / 1000
    lines = _tool().headline(res)
    wc = {r["defense"]: r for r in res["worst_case"]}
    rows = {(r["defense"], r["attack"]): r for r in res["rows"]}
    line = next(x for x in lines if x.startswith("| ssni-n |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # clean, both attacks' expected accuracy, then the worst case: expected and worst-of-4 (= all draws)
    assert cells[1].startswith(f"{100 * rows[('ssni-n', 'pgd-eot')]['clean']:.1f} [")
    assert cells[2].startswith(f"{100 * rows[('ssni-n', 'pgd-eot')]['robust_expected']:.1f} [")
    assert cells[3].startswith(f"{100 * rows[('ssni-n', 'pgd-2')]['robust_expected']:.1f} [")
    assert cells[4].startswith(f"{100 * wc['ssni-n']['robust_expected']:.1f} [")
    assert cells[5].startswith(f"{100 * wc['ssni-n']['robust_worst']:.1f} [")
    # paired against DBP: DBP itself has no line there, the other two have one each
    pair_at = next(i for i, x in enumerate(lines) if "Paired differences against dbp-0.05" in x)
    pairs = [x for x in lines[pair_at:] if x.startswith("| ") and not x.startswith("| defense")]
    assert [x.split("|")[1].strip() for x in pairs[:2]] == ["none", "ssni-n"]
    diff = next(p for p in res["paired"] if p["defense"] == "ssni-n" and p["what"] == "worst-case")["diff"]
    assert f"{100 * diff:+.1f} [" in pairs[1].split("|")[-2]
    # the t* table: DBP's t* is its constant, the bare classifier has none
    t_line = next(x for x in lines if x.startswith("| dbp-0.05 | 0.050 |"))
    assert t_line.count("0.050") == 3 and next(x for x in lines if x.startswith("| none | — |"))


def test_the_low_noise_strength_table_picks_the_lam_by_the_stated_rule(tiny_setup, tmp_path):  # noqa: F811
    low = lambda lam: {"name": f"lownoise-lam{lam}", "attack": "lownoise", "eot": 1, "view": "adaptive",  # noqa: E731
                       "kwargs": {**STEP, "mode": "joint", "lam": lam}}
    learned = {"name": "ssni-learned", "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05, "b": 0.005}}}
    Evaluation(_config(tiny_setup, tmp_path / "ln", defenses=[learned], attacks=[low(1), low(4), low(16)])).run()
    res = __import__("json").loads((tmp_path / "ln" / "results.json").read_text())
    rows = {r["attack"]: r for r in res["rows"]}
    for name, acc in (("lownoise-lam1", 0.5), ("lownoise-lam4", 0.25), ("lownoise-lam16", 0.25)):
        rows[name]["robust_expected"] = acc
    lines = _tool().lownoise_strength(res)
    assert [x.split("|")[2].strip() for x in lines[2:5]] == ["1", "4", "16"]
    assert f"| {rows['lownoise-lam4']['mean_t_adv']:.3f} |" in lines[3]
    # the lowest accuracy, a tie between 4 and 16 going to the smaller weight
    assert lines[-1].endswith("**4**")


def test_a_stage_whose_run_dir_is_gone_keeps_its_collected_section(tmp_path):
    """A replaced machine has no run dirs of the stages that finished before: their sections stay."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    (runs / "eval" / "state" / "dbp_clean" / "k").mkdir(parents=True)
    (runs / "eval" / "state" / "dbp_clean" / "k" / "batch_00000.json").write_text('{"seconds": 90.0}')
    (runs / "reweight").mkdir()  # a fitted file restored from the repository, without its report
    (runs / "reweight" / "reweight.json").write_text("{}")
    out.mkdir()
    (out / "summary.md").write_text("# old\n\n## eval\n\nNot finished (66 batches saved so far).\n\n"
                                    "## convergence\n\nBatches: 18.\n\n| a | b |\n|---|---|\n\n"
                                    "## dbp-tstar\n\nNot run yet.\n\n## reweight\n\nFiles: `reweight/report.md`\n")
    for _ in range(2):  # twice: the section is kept once, with one note
        assert _tool().main(["--runs", str(runs), "--out", str(out)]) == 0
        summary = (out / "summary.md").read_text()
        conv = summary.split("## convergence", 1)[1].split("\n## ", 1)[0]
        assert conv.count("Collected from an earlier run") == 1 and "| a | b |" in conv and "Batches: 18." in conv
    assert summary.split("## reweight", 1)[1].split("\n## ", 1)[0].count("Files: `reweight/report.md`") == 1
    # the unfinished eval is reported from this machine's state, the never-run stage as not run
    assert "Not finished (1 batches saved so far)" in summary and "66 batches" not in summary
    assert summary.split("## dbp-tstar", 1)[1].lstrip().startswith("Not run yet.")
