"""Compare `ssni demo` runs side by side: score norms and robust accuracy.

    .venv/bin/python tools/compare_demos.py runs/demo runs/demo-ts --labels normal TS \
        --out runs/compare-ts.md

For each run it reads calibration/calibration.json (clean score norms of the calibration set) and
eval/results.json (per-sample score norms and t* of every cell, the accuracy rows), then prints
one markdown report:
- score norms: calibration mean and std, mean over the evaluated clean images and over each
  attack's adversarial images (sample-specific defenses share one score network, so the first
  such defense's cells are used), and the AUROC of the score norm separating clean from
  adversarial (1.0: perfectly separated, 0.5: not at all);
- accuracy: clean and robust (expected over draws, worst-of-N) per defense and attack, with the
  95% Wilson intervals of the report, one column group per run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toolkit"))

from ssni.evaluate.report import pct_ci  # noqa: E402
from ssni.io import atomic_write_text  # noqa: E402


def _load(run: Path) -> Dict:
    cal, res = run / "calibration" / "calibration.json", run / "eval" / "results.json"
    for p in (cal, res):
        if not p.is_file():
            raise SystemExit(f"{p} not found: expected a finished `ssni demo` run directory")
    return {"cal": json.loads(cal.read_text()), "res": json.loads(res.read_text())}


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _auroc(clean: Sequence[float], adv: Sequence[float]) -> float:
    """AUROC of 'adversarial' from the score norm (higher norm -> more likely adversarial)."""
    if not clean or not adv:
        return float("nan")
    return float(roc_auc_score([0] * len(clean) + [1] * len(adv), list(clean) + list(adv)))


def score_norm_rows(runs: Dict[str, Dict]) -> List[str]:
    """Markdown rows: calibration stats, clean/adversarial means and AUROC per run and attack.

    All defenses share one score network, so each attack is shown once, from the first defense
    that has both its clean and its attacked score norms.
    """
    lines = ["| run | calibration mean ± std | attack (cell) | eval clean mean | adv mean | "
             "AUROC clean vs adv |", "|---|---|---|---|---|---|"]
    for label, r in runs.items():
        per, cal = r["res"]["per_sample"], f"{r['cal']['mean']:.2f} ± {r['cal']['std']:.2f}"
        shown = []
        for key, cell in per.items():
            defense, attack = key.split("/", 1)
            clean = (per.get(f"{defense}/clean") or {}).get("score_norm")
            if attack == "clean" or attack in shown or not clean or not cell.get("score_norm"):
                continue
            shown.append(attack)
            adv = cell["score_norm"]
            lines.append(f"| {label} | {cal} | {attack} ({defense}) | {_mean(clean):.2f} | "
                         f"{_mean(adv):.2f} | {_auroc(clean, adv):.3f} |")
        if not shown:
            lines.append(f"| {label} | {cal} | — | — | — | — |")
    return lines


def accuracy_rows(runs: Dict[str, Dict]) -> List[str]:
    """Markdown rows: one line per (defense, attack), clean / robust columns for every run."""
    labels = list(runs)
    head = "| defense | attack | " + " | ".join(
        f"{lab}: clean % | {lab}: robust % (expected) | {lab}: worst-of-N % | {lab}: mean t* adv"
        for lab in labels) + " |"
    lines = [head, "|---|---|" + "---|" * (4 * len(labels))]
    keys = []
    for r in runs.values():
        for row in r["res"]["rows"]:
            if (row["defense"], row["attack"]) not in keys:
                keys.append((row["defense"], row["attack"]))
    for d, a in keys:
        cells = []
        for r in runs.values():
            row = next((x for x in r["res"]["rows"] if (x["defense"], x["attack"]) == (d, a)), None)
            if row is None:
                cells += ["—"] * 4
                continue
            t = row.get("mean_t_adv")
            cells += [pct_ci(row["clean"], row["clean_ci"]),
                      pct_ci(row["robust_expected"], row["robust_expected_ci"]),
                      pct_ci(row["robust_worst"], row["robust_worst_ci"]),
                      "—" if t is None else f"{t:.3f}"]
        lines.append(f"| {d} | {a} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and optionally write) the comparison of the given demo run directories."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="demo run directories (run_dir)")
    ap.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    labels = args.labels or [p.name for p in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"{len(labels)} labels for {len(args.runs)} runs: give one label per run")
    runs = {lab: _load(p) for lab, p in zip(labels, args.runs)}
    n = {lab: r["res"]["n"] for lab, r in runs.items()}
    md = ["# Demo runs compared", "", f"Images per run: {n}.", "", "## Score norms", ""]
    md += score_norm_rows(runs) + ["", "## Accuracy", ""] + accuracy_rows(runs)
    text = "\n".join(md) + "\n"
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
