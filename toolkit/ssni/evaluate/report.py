"""Evaluation output: markdown table and PNG plots (score norms, t*, accuracy vs epsilon)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..plotting import pyplot, save_figure


@dataclass
class ResultRow:
    """One line of an evaluation's table: a defense under an attack, the worst over several, or clean only.

    Proportions in [0, 1] with their 95% intervals; worst_k: worst-of-k over the first k draws (when
    more were taken); attacks: the attacks a worst-over-attacks row is taken over.
    """

    defense: str
    attack: str
    budget: str
    n: int
    draws: int
    clean: float
    clean_ci: Optional[Sequence[float]]
    robust_expected: Optional[float] = None
    robust_expected_ci: Optional[Sequence[float]] = None
    robust_worst: Optional[float] = None
    robust_worst_ci: Optional[Sequence[float]] = None
    majority: Optional[float] = None
    majority_ci: Optional[Sequence[float]] = None
    mean_t_clean: Optional[float] = None
    mean_t_adv: Optional[float] = None
    seconds: float = 0.0
    flags: List[str] = field(default_factory=list)
    worst_k: Optional[int] = None
    robust_worst_k: Optional[float] = None
    robust_worst_k_ci: Optional[Sequence[float]] = None
    attacks: Optional[List[str]] = None

    @classmethod
    def of(cls, defense: str, attack: str, budget: str, clean: Dict[str, Any], robust: Optional[Dict[str, Any]],
           majority: Tuple[Optional[float], Any] = (None, None), **rest: Any) -> "ResultRow":
        """A row from the clean accuracy and the attacked one (`draw_accuracy` / `worst_case` dicts;
        robust None: a clean-only row)."""
        r = robust or {}
        return cls(defense, attack, budget, (robust or clean)["n"], clean["draws"], clean["expected"],
                   clean["expected_ci"], r.get("expected"), r.get("expected_ci"), r.get("worst_of_n"),
                   r.get("worst_of_n_ci"), majority[0], majority[1], **rest)

    def as_dict(self) -> Dict[str, Any]:
        """The row as results.json keeps it (worst-of-k and the attacks list only where present)."""
        d = dataclasses.asdict(self)
        if d["worst_k"] is None:
            for k in ("worst_k", "robust_worst_k", "robust_worst_k_ci"):
                d.pop(k)
        if d["attacks"] is None:
            d.pop("attacks")
        return d


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def pct_ci(v: float | None, ci: Sequence[float] | None = None) -> str:
    """A proportion as a percentage with its interval: '81.2 [68, 90]' ('—' when missing)."""
    return f"{_pct(v)}{_ci(ci)}"


def paired_table(paired: List[Dict[str, Any]]) -> List[str]:
    """Report lines of paired differences (`Evaluation._paired` rows): a defense per line, a column per
    comparison, each 'diff [95% interval]' in points; [] when there are none."""
    if not paired:
        return []
    whats = list(dict.fromkeys(p["what"] for p in paired))
    ref = paired[0]["against"]
    lines = ["", f"## Paired differences against {ref}", "",
             f"Per image, each defense's expected accuracy minus {ref}'s on the same image, averaged over the "
             f"{paired[0]['n']} images, in points with a 95% normal interval; worst-case: each defense's own "
             "worst over the attacks it faced.", "",
             "| defense | " + " | ".join(whats) + " |", "|---" * (len(whats) + 1) + "|"]
    for d in dict.fromkeys(p["defense"] for p in paired):
        got = {p["what"]: p for p in paired if p["defense"] == d}
        cells = [f"{100 * got[w]['diff']:+.1f} [{100 * got[w]['ci'][0]:+.1f}, {100 * got[w]['ci'][1]:+.1f}]"
                 if w in got else "—" for w in whats]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(rows: Sequence[Union[ResultRow, Dict[str, Any]]]) -> str:
    """Rows of cell results -> a markdown table (percentages with 95% Wilson intervals).

    worst-of-N: N is the number of draws (shown in the header when every row has the same);
    worst-of-k: the same over the first k draws, a column only when rows carry it (draws > k);
    majority: accuracy of the per-image majority vote over the draws ('—' for results saved without
    per-draw predictions); budget: the attack, its iterations and EOT samples and the purifier it
    differentiated.
    """
    rows = [r.as_dict() if isinstance(r, ResultRow) else r for r in rows]
    draws = {r.get("draws") for r in rows}
    worst = f"worst-of-{draws.pop()}" if len(draws) == 1 and None not in draws else "worst-of-N"
    ks = sorted({r["worst_k"] for r in rows if r.get("worst_k")})
    few = [f"robust % (worst-of-{k})" for k in ks]
    cols = (["defense", "attack", "n", "clean %", "robust % (expected)", *few, f"robust % ({worst})",
             "robust % (majority)", "mean t* clean", "mean t* adv", "seconds"]
            + (["attack budget"] if any(r.get("budget") for r in rows) else []))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        tc, ta = r.get("mean_t_clean"), r.get("mean_t_adv")
        cells = [r["defense"], r["attack"], str(r["n"]), pct_ci(r["clean"], r.get("clean_ci")),
                 pct_ci(r["robust_expected"], r.get("robust_expected_ci"))]
        cells += [pct_ci(r.get("robust_worst_k"), r.get("robust_worst_k_ci")) if r.get("worst_k") == k else "—"
                  for k in ks]
        cells += [pct_ci(r["robust_worst"], r.get("robust_worst_ci")), pct_ci(r.get("majority"), r.get("majority_ci")),
                  "—" if tc is None else f"{tc:.3f}", "—" if ta is None else f"{ta:.3f}", f"{r['seconds']:.0f}"]
        if cols[-1] == "attack budget":
            cells.append(r.get("budget") or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shared_bins(values: List[float], n: int = 30) -> List[float]:
    """n equal bins over the range of all values (padded when they are all equal)."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = max(1e-3, 0.01 * abs(hi))
        lo, hi = lo - pad, hi + pad
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def plot_histograms(series: Dict[str, Dict[str, List[float]]], path: Path, xlabel: str,
                    title: str) -> Path | None:
    """One panel per defense: overlaid histograms (e.g. clean vs adversarial)."""
    series = {k: v for k, v in series.items() if any(len(x) for x in v.values())}
    if not series:
        return None
    plt = pyplot()
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, (name, groups) in zip(axes[0], series.items()):
        bins = _shared_bins([v for vals in groups.values() for v in vals])
        for label, values in groups.items():
            if values:  # each group sums to 1: groups of different sizes stay comparable
                ax.hist(values, bins=bins, alpha=0.55, label=label,
                        weights=[1.0 / len(values)] * len(values))
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of images")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_accuracy_vs_eps(curves: Dict[str, Dict[str, List[float]]], path: Path,
                         title: str) -> Path | None:
    """Accuracy (expected) against epsilon, one line per defense."""
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, c in curves.items():
        ax.plot(c["eps"], c["acc"], marker="o", label=name)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("robust accuracy (expected)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
