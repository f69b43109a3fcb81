"""The score norm: the mean score over the first T' diffusion times (the SSNI paper's EPS), and
its L2 norm per sample.

For x in [0, 1] (mapped to model space 2x - 1), times t_k = k / 1000 for k = 1..T' on the VP SDE,
and `draws` noise draws z per time: x_k = sqrt(ab(t_k)) x + sqrt(1 - ab(t_k)) z,
EPS(x) = mean over (k, draw) of score(x_k, t_k), and the statistic is ||EPS(x)||_2 per sample.

All (sample, time, draw) rows of a chunk go through the network in one batched call; chunks are
sized by `max_batch` rows. Nothing here switches gradients off: under autograd the norm is
differentiable in x (adaptive attacks need that), under `torch.no_grad()` it is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ..config import setting
from ..diffusion import per_sample, to_model_space
from ..images import check_images


@dataclass
class ScoreNormConfig:
    """Settings of the score-norm statistic (saved with every calibration)."""

    timesteps: int = setting(20, ge=1)  # T': the steps 1..T' of 1000 (20 for small images, 50 for ImageNet)
    draws: int = setting(1, ge=1)  # noise draws per time step
    num_steps: int = setting(1000, ge=1)  # the grid the steps live on: t_k = k / num_steps
    max_batch: int = setting(512, ge=1)  # rows (sample x time x draw) per network call
    checkpoint: bool = False  # recompute chunks in backward so attack memory stays flat


def score_times(timesteps: int, num_steps: int = 1000, device=None) -> Tensor:
    """The continuous times k / num_steps for k = 1..timesteps; returns [timesteps]."""
    if not 1 <= timesteps <= num_steps:
        raise ValueError(f"timesteps must be in [1, {num_steps}], got {timesteps}")
    return torch.arange(1, timesteps + 1, device=device, dtype=torch.float32) / num_steps


def _noise(shape, generator: Optional[torch.Generator], seeds: Optional[Tensor],
           device, dtype) -> Tensor:
    """Noise [n, R, C, H, W]: from per-sample seeds (batch-independent) or one generator."""
    if seeds is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    out = []
    for s in seeds.tolist():
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.randn(shape[1:], generator=g, device=device, dtype=dtype))
    return torch.stack(out)


def _chunk_scores(model: nn.Module, x_model: Tensor, noise: Tensor, times: Tensor) -> Tensor:
    """Sum over rows of the score for one chunk; x_model [n,C,H,W], noise [n,R,C,H,W] -> [n,C,H,W]."""
    n, r = noise.shape[:2]
    diffusion = model.diffusion
    t = times.repeat(n)  # row (i, j) has time times[j]
    x_rep = x_model.repeat_interleave(r, dim=0)
    z = noise.reshape(n * r, *noise.shape[2:])
    xt = per_sample(diffusion.mean_coeff(t), x_rep) * x_rep + per_sample(diffusion.sigma(t), x_rep) * z
    return model.score(xt, t).reshape(n, r, *x_model.shape[1:]).sum(1)


def mean_score(model: nn.Module, x: Tensor, timesteps: int = 20, draws: int = 1,
                  generator: Optional[torch.Generator] = None, seeds: Optional[Tensor] = None,
                  max_batch: int = 512, num_steps: int = 1000,
                  checkpoint: bool = False) -> Tensor:
    """The mean score over times 1..T'/num_steps and draws (the SSNI paper's EPS, "expected
    perturbation score"); x [B,C,H,W] in [0,1] -> [B,C,H,W].

    seeds (LongTensor [B]) makes each sample's noise its own, so its EPS does not depend on its
    batch companions; otherwise noise comes from `generator` (or the global RNG).
    """
    check_images(x, name="x")
    if hasattr(model, "check_input"):
        model.check_input(x)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    b = x.shape[0]
    if seeds is not None:
        seeds = torch.as_tensor(seeds).reshape(-1)
        if seeds.numel() != b:
            raise ValueError(f"seeds must have one entry per sample ({b}), got {seeds.numel()}")
    times = score_times(timesteps, num_steps, x.device).repeat_interleave(draws)  # [R]
    rows = times.numel()
    xm = to_model_space(x)
    # Whole samples per chunk when they fit; otherwise one sample with its rows split up.
    per_chunk = max(1, max_batch // rows)
    sums = []
    for a in range(0, b, per_chunk):
        xs = xm[a:a + per_chunk]
        n = xs.shape[0]
        z = _noise((n, rows, *x.shape[1:]), generator,
                   None if seeds is None else seeds[a:a + n], x.device, x.dtype)
        total = None
        for r0 in range(0, rows, max(1, max_batch // n)):
            r1 = min(rows, r0 + max(1, max_batch // n))
            args = (model, xs, z[:, r0:r1], times[r0:r1])
            part = (grad_checkpoint(_chunk_scores, *args, use_reentrant=False)
                    if checkpoint and torch.is_grad_enabled() else _chunk_scores(*args))
            total = part if total is None else total + part
        sums.append(total)
    return torch.cat(sums) / rows


def score_norm(model: nn.Module, x: Tensor, timesteps: int = 20, draws: int = 1,
               generator: Optional[torch.Generator] = None, seeds: Optional[Tensor] = None,
               max_batch: int = 512, num_steps: int = 1000, checkpoint: bool = False) -> Tensor:
    """||mean_score(x)||_2 per sample; x [B,C,H,W] in [0,1] -> [B] (see `mean_score`)."""
    mean = mean_score(model, x, timesteps, draws, generator, seeds, max_batch, num_steps,
                      checkpoint)
    return mean.flatten(1).norm(dim=1)


class ScoreNorm(nn.Module):
    """A score network plus its score-norm settings; forward(x [B,C,H,W] in [0,1]) -> [B].

    Example::

        >>> import torch
        >>> from ssni import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("unet_tiny")  # 8x8 grey; an untrained net's last layer is zero: perturb it
        >>> with torch.no_grad():
        ...     _ = [p.add_(0.02 * torch.randn_like(p)) for p in net.parameters()]
        >>> from ssni import ScoreNorm
        >>> scorer = ScoreNorm(net, timesteps=3)              # mean score over t = 1..3 / 1000
        >>> with torch.no_grad():
        ...     norms = scorer(torch.rand(4, 1, 8, 8), seeds=torch.arange(4))
        >>> tuple(norms.shape), bool((norms > 0).all())
        ((4,), True)
    """

    def __init__(self, model: nn.Module, timesteps: int = 20, draws: int = 1,
                 max_batch: int = 512, num_steps: int = 1000, checkpoint: bool = False):
        super().__init__()
        self.model = model
        self.cfg = ScoreNormConfig(timesteps=timesteps, draws=draws, num_steps=num_steps,
                                   max_batch=max_batch, checkpoint=checkpoint)
        score_times(timesteps, num_steps)  # validate early

    @classmethod
    def from_config(cls, model: nn.Module, cfg: ScoreNormConfig) -> "ScoreNorm":
        """Build from a ScoreNormConfig."""
        return cls(model, timesteps=cfg.timesteps, draws=cfg.draws, max_batch=cfg.max_batch,
                   num_steps=cfg.num_steps, checkpoint=cfg.checkpoint)

    @property
    def nfe_per_sample(self) -> int:
        """Network evaluations per sample (T' x draws)."""
        return self.cfg.timesteps * self.cfg.draws

    def forward(self, x: Tensor, seeds: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Score norms [B] of images x [B,C,H,W] in [0,1]."""
        c = self.cfg
        return score_norm(self.model, x, c.timesteps, c.draws, generator, seeds, c.max_batch,
                          c.num_steps, c.checkpoint)
