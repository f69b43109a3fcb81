"""Plots: a reweighting curve t*(s) over histograms of clean and perturbed score norms (PNG)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..plotting import pyplot, save_figure
from .calibration import Calibration


def _hist_from(values) -> Optional[Dict[str, list]]:
    """Accept a [N] tensor / list of norms or a stored {"edges", "counts"} histogram."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        return {"edges": list(values["edges"]), "counts": list(values["counts"])}
    return {"values": torch.as_tensor(values).detach().float().cpu().flatten().tolist()}


def plot_reweight(reweights: Mapping[str, torch.nn.Module], path: str | os.PathLike,
                  clean=None, perturbed: Optional[Mapping[str, object]] = None,
                  calibration: Optional[Calibration] = None, bins: int = 50,
                  points: Optional[Sequence[Tensor]] = None, title: str = "") -> Path:
    """Draw t*(s) curves (right axis) over score-norm histograms (left axis) and save a PNG.

    clean / perturbed values: [N] norms or stored histograms; if `clean` is None the
    calibration's histogram is used. `points` = (norms [M], oracle t [M]) adds a scatter.
    """
    plt = pyplot()
    hists = {}
    c = _hist_from(clean) if clean is not None else (
        _hist_from(calibration.histogram) if calibration is not None else None)
    if c is not None:
        hists["clean"] = c
    for name, v in (perturbed or {}).items():
        h = _hist_from(v)
        if h is not None:
            hists[name] = h
    if not hists and points is None:
        raise ValueError("nothing to plot: give clean norms, perturbed norms or a calibration")
    lo, hi = float("inf"), float("-inf")
    for h in hists.values():
        vals = h.get("values") or h["edges"]
        lo, hi = min(lo, min(vals)), max(hi, max(vals))
    if points is not None:
        lo, hi = min(lo, float(points[0].min())), max(hi, float(points[0].max()))
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    lo, hi = lo - pad, hi + pad

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    edges = torch.linspace(lo, hi, bins + 1).tolist()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, h) in enumerate(hists.items()):
        col = colors[k % len(colors)]
        if "values" in h:
            ax.hist(h["values"], bins=edges, density=True, alpha=0.35, color=col, label=name)
        else:
            e = torch.tensor(h["edges"])
            cnt = torch.tensor(h["counts"])
            dens = cnt / (cnt.sum().clamp(min=1) * (e[1:] - e[:-1]).clamp(min=1e-12))
            ax.stairs(dens.tolist(), e.tolist(), fill=True, alpha=0.35, color=col, label=name)
    ax.set_xlabel("score norm ||EPS(x)||")
    ax.set_ylabel("density")
    ax2 = ax.twinx()
    s = torch.linspace(lo, hi, 400)
    with torch.no_grad():
        for k, (name, rw) in enumerate(reweights.items()):
            ax2.plot(s.tolist(), rw(s, smooth=False).tolist(), lw=2,
                     color=colors[(k + len(hists)) % len(colors)], label=f"t*: {name}")
    if points is not None:
        ax2.scatter(points[0].tolist(), points[1].tolist(), s=6, c="k", alpha=0.3,
                    label="oracle t*")
    ax2.set_ylabel("t* (noise level)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best", framealpha=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
