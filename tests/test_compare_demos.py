import json
from pathlib import Path

import pytest
from conftest import load_tool


def _tool():
    return load_tool("compare_demos")


def _run(root: Path, clean, adv, acc):
    (root / "calibration").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "calibration/calibration.json").write_text(json.dumps({"mean": 10.0, "std": 1.0}))
    row = {"defense": "ssni-n", "attack": "pgd", "clean": 1.0, "clean_ci": [0.5, 1.0],
           "robust_expected": acc, "robust_expected_ci": [0.1, 0.9], "robust_worst": acc / 2,
           "robust_worst_ci": [0.0, 0.8], "mean_t_adv": 0.1}
    (root / "eval/results.json").write_text(json.dumps({
        "n": len(clean), "rows": [row],
        "per_sample": {"none/clean": {"score_norm": None, "t_star": None},
                       "ssni-n/clean": {"score_norm": clean, "t_star": []},
                       "ssni-n/pgd": {"score_norm": adv, "t_star": []}}}))
    return root


def test_compare_demos_auroc_and_table(tmp_path, capsys):
    tool = _tool()
    assert tool._auroc([1, 2], [3, 4]) == 1.0 and tool._auroc([3, 4], [1, 2]) == 0.0
    assert tool._auroc([1, 3], [2, 4]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    a = _run(tmp_path / "a", [1.0, 2.0], [3.0, 4.0], 0.5)
    b = _run(tmp_path / "b", [1.0, 3.0], [2.0, 4.0], 0.25)
    assert tool.main([str(a), str(b), "--labels", "A", "B", "--out", str(tmp_path / "c.md")]) == 0
    out = (tmp_path / "c.md").read_text()
    assert "| A | 10.00 ± 1.00 | pgd (ssni-n) | 1.50 | 3.50 | 1.000 |" in out
    assert "| B | 10.00 ± 1.00 | pgd (ssni-n) | 2.00 | 3.00 | 0.750 |" in out
    assert "| ssni-n | pgd | 100.0 [50, 100] | 50.0 [10, 90] | 25.0 [0, 80] | 0.100 | " \
           "100.0 [50, 100] | 25.0 [10, 90] | 12.5 [0, 80] | 0.100 |" in out
    with pytest.raises(SystemExit):
        tool.main([str(a), str(tmp_path / "missing")])
