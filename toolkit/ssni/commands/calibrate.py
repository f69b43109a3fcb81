"""`ssni calibrate`: clean score norms of a score network -> calibration.json and a plot.

Under torchrun each process scores every world-th batch (sample seeds unchanged), the norms are
gathered, and rank 0 writes: the calibration equals the one-process one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from ..config import save_config, setting
from ..data import DataConfig, build_dataset
from ..dist import DistContext, join_shards
from ..io import remove_stale_temps
from ..models.load import load_score_model
from ..scoring import ScoreNorm, ScoreNormConfig, build_reweight, compute_norms, histogram, plot_reweight
from ..scoring.calibration import calibration_from_norms
from .registry import command


@dataclass
class CalibrateConfig:
    """Everything `ssni calibrate` needs."""

    # directory: calibration.json, score_norms.png
    output: str = setting("runs/calibration-digits", directory=True)
    # checkpoint or run directory, or a public checkpoint {format: ..., path: ..., options}
    score_model: Union[str, Dict[str, Any]] = "runs/score-digits"
    score_weights: str = "auto"  # auto (EMA when present) | ema | model
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "train"
    count: int = setting(5000, ge=1)  # clean images (all if fewer)
    score_norm: ScoreNormConfig = field(default_factory=ScoreNormConfig)
    batch_size: int = setting(256, ge=1)
    seed: int = 0
    bins: int = setting(50, ge=1)
    # Gaussian-noise copies, only for the plot's "perturbed" histograms (cheap, no classifier)
    plot_noise_std: List[float] = setting(default_factory=lambda: [0.05, 0.1], gt=0)
    plot_t_base: float = setting(0.1, ge=0, le=1)  # t_base of the constant / linear / sigmoid curves drawn in the plot
    device: str = "auto"
    progress: bool = True


@command("calibrate", CalibrateConfig, "score norms of clean images -> calibration JSON (+ plot)")
def run_calibrate(cfg: CalibrateConfig) -> Dict[str, Any]:
    """Calibrate a score network on clean images; writes calibration.json and a plot."""
    dist = DistContext.from_env(cfg.device)
    device = dist.device
    model = load_score_model(cfg.score_model, cfg.score_weights).to(device).eval()
    ds = build_dataset(cfg.data, cfg.split)
    if tuple(ds.image_shape) != tuple(model.input_shape):
        raise ValueError(f"data images are {list(ds.image_shape)} but the score network expects "
                         f"{list(model.input_shape)}; set data.image_size / data.channels")
    n = len(ds)
    idx = torch.arange(n)
    if cfg.count < n:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.sort(torch.randperm(n, generator=g)[:cfg.count]).values
    images = ds.images[idx]
    info = {"name": cfg.data.name, "split": cfg.split, "image_size": cfg.data.image_size,
            "indices_seed": cfg.seed}
    scorer = ScoreNorm.from_config(model, cfg.score_norm)
    progress = cfg.progress and dist.is_main

    def norms_of(x: torch.Tensor, seed: int, desc: str) -> torch.Tensor:
        """Score norms [N] of x: this rank's batches, gathered from every rank."""
        part = compute_norms(scorer, x, cfg.batch_size, seed, device, progress, desc, dist.rank, dist.world_size)
        return join_shards(dist.all_gather_object(part), cfg.batch_size)

    norms = norms_of(images, cfg.seed, "calibrate")
    cal = calibration_from_norms(model, norms, cfg.score_norm, cfg.bins, list(images.shape[1:]), info)
    perturbed = {}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for std in cfg.plot_noise_std:
        noisy = (images + std * torch.randn(images.shape, generator=g)).clamp(0, 1)
        pn = norms_of(noisy, cfg.seed + 2, f"noise {std:g}")
        perturbed[f"gaussian {std:g}"] = pn
        cal.perturbed[f"gaussian {std:g}"] = histogram(pn, cfg.bins)
    out = Path(cfg.output)
    path, png = out / "calibration.json", out / "score_norms.png"
    if dist.is_main:  # every rank holds the same norms; one writes
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, depth=0)  # what a killed run's unfinished writes left
        save_config(cfg, out)
        cal.save(path)
        curves = {name: build_reweight(name, cal, t_base=cfg.plot_t_base)
                  for name in ("constant", "linear", "sigmoid")}
        png = plot_reweight(curves, png, clean=norms, perturbed=perturbed,
                            title=f"{cal.model_name} score norms (T'={cfg.score_norm.timesteps})")
    dist.close()  # after a last barrier: the files exist when any rank returns
    return {"calibration": str(path), "plot": str(png), "count": cal.count, "mean": cal.mean,
            "std": cal.std, "q01": cal.quantile(0.01), "q99": cal.quantile(0.99),
            "fingerprint": cal.fingerprint,
            "perturbed_mean": {k: float(v.mean()) for k, v in perturbed.items()}}
