"""Calibration: score-norm statistics of clean training images, tied to one score network.

A calibration file (JSON) holds the mean, std, quantiles and a histogram of the clean score norms,
the score-norm settings they were computed with, and a fingerprint of the score network's
weights. Reweights read mu / std / quantiles from it; using it with another network is refused.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..dist import join_shards, shard_starts  # noqa: F401  (join_shards: re-exported here for callers)
from ..io import atomic_write_json, read_json
from ..models import weights_fingerprint
from ..seeding import block_seeds
from .score_norm import ScoreNorm, ScoreNormConfig

# Stored quantile levels; `Calibration.quantile` interpolates between them.
QUANTILE_LEVELS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7,
                   0.75, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
FORMAT_VERSION = 1


class CalibrationMismatchError(ValueError):
    """A calibration is used with a score network (or settings) other than its own."""


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a score network's weights (SHA-256 prefix over names, shapes, values)."""
    return weights_fingerprint(model)


@dataclass
class Calibration:
    """Clean score-norm statistics plus the identity of the network that produced them."""

    mean: float
    std: float
    count: int
    quantiles: Dict[str, float]
    histogram: Dict[str, List[float]]  # {"edges": [bins + 1], "counts": [bins]}
    fingerprint: str
    score_norm: Dict[str, Any]  # the ScoreNormConfig fields that shape the statistic
    model_name: Optional[str] = None
    image_shape: Optional[List[int]] = None
    data: Dict[str, Any] = field(default_factory=dict)
    perturbed: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)  # name -> histogram
    version: int = FORMAT_VERSION

    # -- statistics --------------------------------------------------------------------------
    def quantile(self, q: float) -> float:
        """Clean score-norm quantile at level q in [0, 1] (linear between stored levels)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile level must be in [0, 1], got {q}")
        levels = sorted((float(k), v) for k, v in self.quantiles.items())
        for (q0, v0), (q1, v1) in zip(levels[:-1], levels[1:]):
            if q0 <= q <= q1:
                return v0 if q1 == q0 else v0 + (v1 - v0) * (q - q0) / (q1 - q0)
        raise ValueError(f"quantile level {q} is outside the stored levels")

    # -- checks ----------------------------------------------------------------------------
    def check_model(self, model: nn.Module, score_norm: Optional[ScoreNormConfig] = None) -> None:
        """Raise CalibrationMismatchError unless `model` (and settings) made this calibration."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            name = getattr(model, "model_name", type(model).__name__)
            raise CalibrationMismatchError(
                f"this calibration was made with another score network (fingerprint "
                f"{self.fingerprint}, model {self.model_name!r}); the given score network "
                f"{name!r} has fingerprint {fp}. Recalibrate with `ssni calibrate` for this "
                f"network.")
        if score_norm is not None:
            for key in ("timesteps", "draws", "num_steps"):
                mine, theirs = self.score_norm.get(key), getattr(score_norm, key)
                if mine is not None and mine != theirs:
                    raise CalibrationMismatchError(
                        f"score-norm setting {key}={theirs} differs from the calibration's "
                        f"{key}={mine}; the statistic is not comparable. Use {key}={mine} or "
                        f"recalibrate.")

    # -- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration JSON atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a calibration JSON (a file, or a run directory holding calibration.json)."""
        data = read_json(path, "calibration file", "calibration.json", "make one with `ssni calibrate`")
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a calibration file: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise ValueError(f"{path} is not a calibration file: missing keys {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


def summarize(norms: Tensor, bins: int = 50) -> Dict[str, Any]:
    """Mean, std, quantiles and histogram of score norms [N] (as plain floats)."""
    s = norms.detach().double().cpu().flatten()
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise ValueError("score norms must be a non-empty finite tensor")
    qs = torch.quantile(s, torch.tensor(QUANTILE_LEVELS, dtype=torch.float64))
    return {"mean": float(s.mean()), "std": float(s.std()) if s.numel() > 1 else 0.0,
            "count": int(s.numel()),
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILE_LEVELS, qs)},
            "histogram": histogram(s, bins)}


def histogram(norms: Tensor, bins: int = 50, lo: float | None = None,
              hi: float | None = None) -> Dict[str, List[float]]:
    """Histogram of [N] values: {"edges": [bins+1], "counts": [bins]}."""
    s = norms.detach().double().cpu().flatten()
    lo = float(s.min()) if lo is None else lo
    hi = float(s.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(s, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


@torch.no_grad()
def compute_norms(scorer: ScoreNorm, images: Tensor, batch_size: int = 256, seed: int = 0,
                  device: torch.device | str = "cpu", progress: bool = False,
                  desc: str = "score norms", rank: int = 0, world: int = 1) -> Tensor:
    """Score norms [N] of images [N,C,H,W] in [0,1], batched; sample i's seed is seed block
    `seed`, index i (so a sample's norm does not depend on the batching). With world > 1 only
    this rank's batches (`shard_starts`) are scored: [its share]; `join_shards` rebuilds [N]."""
    from tqdm.auto import tqdm

    out = [torch.zeros(0)]
    for a in tqdm(shard_starts(images.shape[0], batch_size, rank, world), disable=not progress, desc=desc):
        x = images[a:a + batch_size].to(device)
        seeds = block_seeds(seed, a, x.shape[0])
        out.append(scorer(x, seeds=seeds).float().cpu())
    return torch.cat(out)


def calibration_from_norms(model: nn.Module, norms: Tensor, score_norm: ScoreNormConfig | None = None,
                           bins: int = 50, image_shape: Optional[List[int]] = None,
                           data_info: Optional[Dict[str, Any]] = None) -> Calibration:
    """The Calibration of `model` from its clean score norms [N] (computed with `score_norm`)."""
    cfg = score_norm or ScoreNormConfig()
    stats = summarize(norms, bins)
    return Calibration(**stats, fingerprint=model_fingerprint(model),
                       score_norm={"timesteps": cfg.timesteps, "draws": cfg.draws, "num_steps": cfg.num_steps},
                       model_name=getattr(model, "model_name", type(model).__name__),
                       image_shape=None if image_shape is None else list(image_shape),
                       data=dict(data_info or {}))


def calibrate(model: nn.Module, images: Tensor, score_norm: ScoreNormConfig | None = None,
              batch_size: int = 256, seed: int = 0, bins: int = 50, progress: bool = False,
              data_info: Optional[Dict[str, Any]] = None) -> tuple[Calibration, Tensor]:
    """Calibrate on clean images [N,C,H,W] in [0,1] in one process; returns (Calibration, norms [N]).

    Example::

        >>> import torch
        >>> from ssni import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("unet_tiny")  # 8x8 grey; an untrained net's last layer is zero: perturb it
        >>> with torch.no_grad():
        ...     _ = [p.add_(0.02 * torch.randn_like(p)) for p in net.parameters()]
        >>> from ssni import calibrate
        >>> cal, norms = calibrate(net, torch.rand(16, 1, 8, 8), batch_size=16)   # clean images
        >>> tuple(norms.shape), cal.mean > 0, cal.std > 0
        ((16,), True, True)
    """
    cfg = score_norm or ScoreNormConfig()
    device = next(iter(model.parameters()), torch.empty(0)).device
    scorer = ScoreNorm.from_config(model, cfg)
    norms = compute_norms(scorer, images, batch_size, seed, device, progress, "calibrate")
    cal = calibration_from_norms(model, norms, cfg, bins, list(images.shape[1:]), data_info)
    return cal, norms
