"""Collect the Fashion-MNIST study's small results from runs/fmnist/ into results/fmnist/ (committed).

    python tools/fmnist_results.py [--runs runs/fmnist] [--out results/fmnist]

For each stage that has finished (tools/fmnist_study.sh): its report, results.json and plots are
copied; DBP's t* curve and the convergence check are drawn and tabulated; summary.md says, stage by
stage, what is there, the compute time its batches took (wall seconds x threads), and what is
still missing. A stage still running is reported as such, never as a result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "toolkit"))

from ssni.evaluate.report import paired_table, pct_ci  # noqa: E402
from ssni.plotting import pyplot, save_figure  # noqa: E402

COPY = {"eval": ["report.md", "results.json", "t_star.png", "score_norms.png", "accuracy_vs_eps.png", "config.yaml"],
        "eval-autoattack": ["report.md", "results.json", "config.yaml"],
        "convergence": ["report.md", "results.json", "config.yaml"],
        "lownoise-strength": ["report.md", "results.json", "config.yaml"],
        "dbp-tstar": ["report.md", "results.json", "config.yaml"],
        "reweight": ["report.md", "reweight.json", "reweight.png", "config.yaml"],
        "calibration": ["calibration.json", "score_norms.png", "config.yaml"]}


def compute_seconds(run: Path) -> Optional[Dict[str, Any]]:
    """Seconds the saved batches of an evaluation took, and the thread count its config records."""
    from ssni.evaluate import saved_cell

    res = run / "results.json"
    keys = json.loads(res.read_text()).get("cell_keys") if res.is_file() else None
    if keys:  # a finished run: its own cells' batches (not those of cells a changed config left behind)
        batches = [b for cell in keys for b in saved_cell(run, cell)]
    else:
        batches = [json.loads(b.read_text()) for b in (run / "state").rglob("batch_*.json")]
    if not batches:
        return None
    seconds = sum(b.get("seconds", 0.0) for b in batches)
    threads = None
    cfg = run / "config.yaml"
    if cfg.is_file():
        threads = ((yaml.safe_load(cfg.read_text()) or {}).get("runtime") or {}).get("threads")
    return {"batches": len(batches), "seconds": seconds, "threads": threads}


def progress(run: Path) -> List[str]:
    """Saved batches per cell (and key) folder of an unfinished evaluation's state, as a list for the
    summary; a cell's older keys (results of settings it no longer has) show as folders of their own."""
    state = run / "state"
    if not state.is_dir():
        return []
    counts: Dict[str, int] = {}
    for b in state.rglob("batch_*.json"):
        name = str(b.parent.relative_to(state))
        counts[name] = counts.get(name, 0) + 1
    return [f"- `{name}`: {n} batch(es)" for name, n in sorted(counts.items())] + [""]


def tstar_curve(res: Dict[str, Any], out: Path) -> List[str]:
    """DBP's clean and robust accuracy against t* (the rows named dbp-<t>), a plot and the chosen t*."""
    pts = []
    for r in res["rows"]:
        if r["defense"].startswith("dbp-") and r["robust_expected"] is not None:
            pts.append((float(r["defense"][4:]), r))
    if not pts:
        return []
    pts.sort(key=lambda p: p[0])
    none = next((r for r in res["rows"] if r["defense"] == "none" and r["robust_expected"] is not None), None)
    best = max(pts, key=lambda p: (round(p[1]["robust_expected"], 6), p[1]["clean"]))
    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    ts = [t for t, _ in pts]
    for key, label in (("clean", "clean"), ("robust_expected", "PGD-EOT (expected)")):
        ys = [100 * r[key] for _, r in pts]
        lo = [100 * r[f"{key}_ci"][0] for _, r in pts]
        hi = [100 * r[f"{key}_ci"][1] for _, r in pts]
        ax.plot(ts, ys, marker="o", label=label)
        ax.fill_between(ts, lo, hi, alpha=0.2)
    ax.axvline(best[0], color="grey", ls="--", lw=1)
    ax.set_xlabel("constant t*")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"DBP on {res['n']} validation images: accuracy vs t*")
    ax.legend()
    save_figure(fig, out / "dbp_tstar.png")
    lines = ["| t* | clean % | robust % (expected) | robust % (worst-of-N) |", "|---|---|---|---|"]
    if none is not None:
        lines.append(f"| none | {pct_ci(none['clean'], none['clean_ci'])} | "
                     f"{pct_ci(none['robust_expected'], none['robust_expected_ci'])} | "
                     f"{pct_ci(none['robust_worst'], none['robust_worst_ci'])} |")
    lines += [f"| {t:g} | {pct_ci(r['clean'], r['clean_ci'])} | {pct_ci(r['robust_expected'], r['robust_expected_ci'])}"
              f" | {pct_ci(r['robust_worst'], r['robust_worst_ci'])} |" for t, r in pts]
    return lines + ["", f"Chosen t* (best robust, ties: higher clean): **{best[0]:g}**"]


def per_image(run: Path, cell: str) -> Optional[Any]:
    """Each image's expected accuracy in one saved cell (`<defense>/<attack>`) of the evaluation in
    `run`, [N] (mean over draws), or None when the cell has no saved batch."""
    import torch

    from ssni.evaluate import saved_cell

    rows = [row for b in saved_cell(run, cell) for row in b["correct"]]
    return torch.tensor(rows, dtype=torch.float64).mean(1) if rows else None


def _budget(label: str) -> Optional[tuple]:
    """(iterations, EOT) of a budget label such as '20x2', else None."""
    it, _, eot = label.partition("x")
    return (int(it), int(eot)) if it.isdigit() and eot.isdigit() else None


def convergence(res: Dict[str, Any], out: Path, run: Optional[Path] = None) -> List[str]:
    """Robust accuracy at each budget of the convergence run (attacks named <family>-<it>x<eot>) and,
    for every doubling of the iterations or the EOT samples the run holds, the paired difference over
    the same images (per-image results saved in `run`) with its 95% interval: the check is that
    doubling changes accuracy by less than 2 points."""
    from ssni.evaluate.metrics import paired_difference

    table: Dict[str, Dict[tuple, Dict[str, Any]]] = {}
    for r in res["rows"]:
        family, _, label = r["attack"].rpartition("-")
        if r["robust_expected"] is None or _budget(label) is None:
            continue
        table.setdefault(f"{r['defense']} / {family}", {})[_budget(label)] = r
    if not table:
        return []
    budgets = sorted({b for by in table.values() for b in by}, key=lambda b: (b[0] * b[1], b[0]))
    doublings = [(a, b) for a in budgets for b in budgets if b in ((2 * a[0], a[1]), (a[0], 2 * a[1]))]
    name = lambda b: f"{b[0]}x{b[1]}"  # noqa: E731
    lines = ["| defense / attack | " + " | ".join(f"{name(b)} robust %" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    pairs = ["| defense / attack | doubling | paired difference, points (95%) |", "|---|---|---|"]
    fig, (ax, ax_d) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for k, (label, by) in enumerate(table.items()):
        lines.append(f"| {label} | " + " | ".join(pct_ci(by[b]["robust_expected"], by[b]["robust_expected_ci"])
                                                 if b in by else "—" for b in budgets) + " |")
        xs = [i for i, b in enumerate(budgets) if b in by]
        ax.plot(xs, [100 * by[budgets[i]]["robust_expected"] for i in xs], marker="o", label=label, color=f"C{k}")
        for j, (a, b) in enumerate(doublings):
            if a not in by or b not in by:
                continue
            ra, rb = by[a], by[b]
            sa = None if run is None else per_image(run, f"{ra['defense']}/{ra['attack']}")
            sb = None if run is None else per_image(run, f"{rb['defense']}/{rb['attack']}")
            if sa is None or sb is None or sa.shape != sb.shape:  # no per-image results: the plain difference
                pairs.append(f"| {label} | {name(a)} -> {name(b)} | "
                             f"{100 * (rb['robust_expected'] - ra['robust_expected']):+.1f} |")
                continue
            d = paired_difference(sb, sa)
            pairs.append(f"| {label} | {name(a)} -> {name(b)} | {100 * d['diff']:+.1f} "
                         f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] |")
            x = j + (k - (len(table) - 1) / 2) * 0.08  # side by side, not on top of each other
            ax_d.errorbar([x], [100 * d["diff"]], yerr=[[100 * (d["diff"] - d["ci"][0])], [100 * (d["ci"][1] - d["diff"])]],
                          marker="o", capsize=3, color=f"C{k}")
    ax.set_xticks(range(len(budgets)), [f"{b[0]} it x EOT {b[1]}" for b in budgets], fontsize=7)
    ax.set_ylabel("robust accuracy % (expected)")
    ax.set_title(f"Robust accuracy, {res['n']} test images")
    ax.legend(fontsize=7)
    ax_d.axhspan(-2, 2, color="0.9", label="within 2 points")
    ax_d.axhline(0, color="0.5", lw=0.8)
    ax_d.set_xticks(range(len(doublings)), [f"{name(a)}\n-> {name(b)}" for a, b in doublings], fontsize=7)
    ax_d.set_xlim(-0.5, len(doublings) - 0.5)
    ax_d.set_ylabel("paired difference, points (95% interval)")
    ax_d.set_title("Doubling the iterations or the EOT samples")
    ax_d.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "convergence.png")
    return lines + ["", "Each doubling of the budget (iterations x EOT), paired over the same images:", ""] + pairs


def lownoise_strength(res: Dict[str, Any]) -> List[str]:
    """The low-noise attack at each weight lam: robust accuracy and the t* it left, per defense, and the
    lam the evaluation uses by the rule fixed before the run (lowest expected accuracy of ssni-learned,
    ties: the smaller lam)."""
    rows = [r for r in res["rows"] if r["robust_expected"] is not None and r["attack"].startswith("lownoise-lam")]
    if not rows:
        return []
    lam = lambda r: float(r["attack"][len("lownoise-lam"):])  # noqa: E731
    lines = ["| defense | lam | robust % (expected) | robust % (worst-of-N) | mean t* clean | mean t* attacked |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["defense"], lam(r))):
        lines.append(f"| {r['defense']} | {lam(r):g} | {_pct(r, 'robust_expected')} | {_pct(r, 'robust_worst')} | "
                     f"{r['mean_t_clean']:.3f} | {r['mean_t_adv']:.3f} |")
    learned = [r for r in rows if r["defense"] == "ssni-learned"]
    if learned:
        best = min(learned, key=lambda r: (round(r["robust_expected"], 6), lam(r)))
        lines += ["", f"The evaluation's lam (lowest expected accuracy of ssni-learned, ties: smaller): **{lam(best):g}**"]
    return lines


def _pct(r: Optional[Dict[str, Any]], key: str) -> str:
    """'x.x [lo, hi]' for a row's proportion `key` (and `key`_ci); '—' when the row or value is missing."""
    return pct_ci(r[key], r[f"{key}_ci"]) if r and r.get(key) is not None else "—"


def headline(res: Dict[str, Any], aa: Optional[Dict[str, Any]] = None) -> List[str]:
    """The study's table (what the README shows), from eval's results.json and, if given,
    eval-autoattack's: per defense, clean accuracy, each attack's expected robust accuracy, the worst
    case over its attacks (expected / worst-of-4 / worst-of-N), AutoAttack's expected accuracy, then
    the paired differences against the reference defense and the mean t* each attack left."""
    attacks = [a["name"] for a in res["attacks"]]
    rows: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in res["rows"] + res["worst_case"]:
        rows.setdefault(r["defense"], {})[r["attack"]] = r
    aa_rows: Dict[str, Dict[str, Any]] = {}
    aa_name = None
    if aa is not None and aa["attacks"]:
        aa_name = aa["attacks"][0]["name"]
        aa_rows = {r["defense"]: r for r in aa["rows"] if r["attack"] == aa_name}
    draws = res["draws"]
    k = next((r["worst_k"] for d in rows.values() for r in d.values() if r.get("worst_k")), None)
    head = (["defense", "clean %"] + [f"{a} %" for a in attacks]
            + ["worst case: expected %"] + ([f"worst-of-{k} %"] if k else []) + [f"worst-of-{draws} %"]
            + ([f"{aa_name} % (n = {aa['n']})"] if aa_name else []))
    lines = [f"n = {res['n']} test images, {draws} draws each; robust accuracy is expected accuracy (mean over "
             "draws) unless the column says worst-of-k; 95% Wilson intervals.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    clean = {d: next(iter(by.values())) for d, by in rows.items()}  # clean and t* clean: on every row
    for d, by in rows.items():
        first = clean[d]
        wc = by.get("worst-case") or (by[attacks[0]] if len([a for a in attacks if a in by]) == 1 else None)
        cells = [d, _pct(first, "clean")] + [_pct(by.get(a), "robust_expected") for a in attacks]
        cells += [_pct(wc, "robust_expected")] + ([_pct(wc, "robust_worst_k")] if k else []) + [_pct(wc, "robust_worst")]
        if aa_name:
            cells.append(_pct(aa_rows.get(d), "robust_expected"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += paired_table(res.get("paired") or [])  # the report's own section
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines += ["", "Mean t* the defense chose (clean images, then each attack's adversarial images):", "",
              "| defense | clean | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 2) + "|"]
    for d, by in rows.items():
        lines.append(f"| {d} | {fmt(clean[d].get('mean_t_clean'))} | "
                     + " | ".join(fmt((by.get(a) or {}).get("mean_t_adv")) for a in attacks) + " |")
    return lines


def adversarial_grid(run: Path, out: Path, k: int = 8) -> Optional[Path]:
    """The first k saved adversarial images of every attacked cell (`save_adversarial`), one row per
    cell, each titled with its true class and the class most draws predicted (state batch 0)."""
    from ssni.evaluate import saved_adversarial, saved_cell

    res = run / "results.json"
    cells = list(json.loads(res.read_text()).get("cell_keys", {})) if res.is_file() else []
    # batch 0 of each cell, whose predictions are in its saved state (a cell whose batch 0 was computed
    # on another machine has no images here unless tools/study_state.py carried them)
    shown = [(c, a[0]) for c in cells for a in [saved_adversarial(run, c, batch=0)] if a]
    if not shown:
        return None
    fig, axes = pyplot().subplots(len(shown), k, figsize=(1.1 * k, 1.25 * len(shown)), squeeze=False)
    for i, (cell, saved) in enumerate(shown):
        first = saved_cell(run, cell)[:1]
        preds = first[0].get("pred") if first else None
        for j in range(k):
            ax = axes[i][j]
            ax.axis("off")
            if j >= saved["x_adv"].shape[0]:
                continue
            img = saved["x_adv"][j].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            votes = preds[j] if preds else []
            top = max(set(votes), key=votes.count) if votes else None
            ax.set_title(f"{int(saved['y'][j])}->{top}" if top is not None else f"{int(saved['y'][j])}", fontsize=7)
        axes[i][0].text(-0.1, 0.5, cell.replace("/", "\n", 1), transform=axes[i][0].transAxes, ha="right",
                        va="center", fontsize=6)
    fig.suptitle("adversarial images (true class -> the class most draws predicted)", fontsize=8)
    return save_figure(fig, out / "adversarial_examples.png")


def finished(run: Path, first_file: str) -> bool:
    """Whether a stage's last run finished: its report file exists and no batch was saved after it
    (a stage whose recipe grew, running again in the same folder, is not finished)."""
    report = run / first_file
    if not report.is_file():
        return False
    written = report.stat().st_mtime
    return not any(b.stat().st_mtime > written for b in (run / "state").rglob("batch_*"))


def earlier_sections(summary: Path) -> Dict[str, List[str]]:
    """{stage: its section's lines} of an earlier summary.md, for the stages it reported as finished."""
    if not summary.is_file():
        return {}
    sections: Dict[str, List[str]] = {}
    stage = None
    for line in summary.read_text().splitlines():
        if line.startswith("## "):
            stage = line[3:].strip()
            sections[stage] = []
        elif stage is not None:
            sections[stage].append(line)
    unfinished = ("Not finished", "Not run yet")
    return {k: v for k, v in sections.items() if not any(line.startswith(unfinished) for line in v)}


def main(argv: Optional[List[str]] = None) -> int:
    """Copy, tabulate and plot what has finished; write summary.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "fmnist"))
    p.add_argument("--out", default=str(ROOT / "results" / "fmnist"))
    args = p.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Fashion-MNIST study: collected results", "",
          "Made by `python tools/fmnist_results.py` from `runs/fmnist/` (stages: `tools/fmnist_study.sh`).", ""]
    earlier = earlier_sections(out / "summary.md")
    for stage, files in COPY.items():
        src = runs / stage
        ran_here = (src / files[0]).is_file() or any((src / "state").rglob("batch_*.json"))
        if stage in earlier and not ran_here:
            # finished on a machine whose run dirs are gone (this one may hold a restored fitted file, e.g.
            # reweight.json, but no report and no batch): its collected files stay, and so does its section
            body = [line for line in earlier[stage] if not line.startswith("(Collected from an earlier run")]
            while body and not body[0].strip():
                body = body[1:]
            note = f"(Collected from an earlier run; its run, {stage}/, is not on this machine.)"
            md += [f"## {stage}", "", note, ""] + body
            continue
        done = finished(src, files[0]) and (stage != "reweight" or (src / "reweight.json").is_file())
        md += [f"## {stage}", ""]
        cost = compute_seconds(src)
        if not done:
            md += [f"Not finished ({cost['batches']} batches saved so far)." if cost else "Not run yet.", ""]
            md += progress(src)
            continue
        dst = out / stage
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            if (src / f).is_file():
                shutil.copyfile(src / f, dst / f)
        if cost:
            th = cost["threads"]
            md += [f"Batches: {cost['batches']}, {cost['seconds'] / 3600:.2f} h of wall time at {th} thread(s)"
                   + (f" = {cost['seconds'] * th / 3600:.2f} CPU-hours." if th else "."), ""]
        if stage == "dbp-tstar":
            md += tstar_curve(json.loads((src / "results.json").read_text()), out) + [""]
        if stage == "convergence":
            md += convergence(json.loads((src / "results.json").read_text()), out, src) + [""]
        if stage == "lownoise-strength":
            md += lownoise_strength(json.loads((src / "results.json").read_text())) + [""]
        if stage == "eval":
            aa_res = runs / "eval-autoattack" / "results.json"
            md += ["### The table", ""] + headline(json.loads((src / "results.json").read_text()),
                                                     json.loads(aa_res.read_text()) if aa_res.is_file() else None) + [""]
            grid = adversarial_grid(src, dst)
            if grid is not None:
                md += [f"Adversarial examples (the first 8 of each attacked cell; all of them stay in "
                       f"`runs/fmnist/eval/adv/`): `eval/{grid.name}`", ""]
        md += [f"Files: {', '.join(f'`{stage}/{f}`' for f in files if (dst / f).is_file())}", ""]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
