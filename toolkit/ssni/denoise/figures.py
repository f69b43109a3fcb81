"""PNG figures for denoiser evaluations: transfer-matrix heat map, example images."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor

from ..plotting import pyplot, save_figure


def transfer_heatmap(matrix: Sequence[Sequence[float]], sources: List[str], targets: List[str],
                     path: str | Path, title: str = "PSNR (dB) under transferred attacks",
                     reference: Sequence[float] | None = None) -> Path:
    """Heat map of matrix[source][target] (e.g. PSNR); an optional first row of reference values
    (e.g. the no-attack PSNR per target) is drawn above, labelled 'no attack'."""
    plt = pyplot()
    data = np.asarray(matrix, dtype=float)
    rows = list(sources)
    if reference is not None:
        data = np.vstack([np.asarray(reference, dtype=float)[None], data])
        rows = ["no attack"] + rows
    fig, ax = plt.subplots(figsize=(1.4 + 1.25 * len(targets), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("denoiser evaluated (target)")
    ax.set_ylabel("attack made on (source)")
    lo, hi = np.nanmin(data), np.nanmax(data)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            light = (data[i, j] - lo) < 0.5 * (hi - lo)
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    if reference is not None:
        ax.axhline(0.5, color="white", lw=2)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _show(ax, img: Tensor) -> None:
    a = img.detach().float().clamp(0, 1).cpu()
    if a.shape[0] == 1:
        ax.imshow(a[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(a.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(rows: Dict[str, Dict[str, Tensor]], path: str | Path,
                 captions: Dict[str, Dict[str, str]] | None = None) -> Path:
    """Grid of images: one row per key of `rows`, columns the keys of each row ([C,H,W] in [0,1]).

    Typical columns: clean / noisy / attacked / denoised(noisy) / denoised(attacked).
    """
    plt = pyplot()
    names = list(rows)
    cols = list(rows[names[0]])
    fig, axes = plt.subplots(len(names), len(cols), figsize=(2.1 * len(cols), 2.3 * len(names)),
                             squeeze=False)
    for i, r in enumerate(names):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            _show(ax, rows[r][c])
            cap = (captions or {}).get(r, {}).get(c, "")
            ax.set_title(f"{c}\n{cap}" if cap else c, fontsize=8)
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def statistic_histogram(values: Dict[str, Tensor], path: str | Path, band: float | None = None,
                        title: str = "typical-set statistic ||r||^2/(d s^2) - 1") -> Path:
    """Overlaid histograms of per-sample statistics (e.g. Gaussian vs attacked residuals);
    `band` draws the eps-typical interval [-band, band]."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    allv = torch.cat([v.flatten().float() for v in values.values()])
    bins = np.linspace(float(allv.min()), float(allv.max()) + 1e-9, 40)
    for i, (name, v) in enumerate(values.items()):
        # the first series (the reference) filled, the others as outlines so overlaps stay legible
        ax.hist(v.flatten().float().numpy(), bins=bins, label=name,
                **(dict(alpha=0.5) if i == 0 else dict(histtype="step", linewidth=1.4)))
    if band is not None:
        ax.axvspan(-band, band, color="grey", alpha=0.15, label="typical set")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
