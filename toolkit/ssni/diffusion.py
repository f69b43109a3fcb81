"""The VP diffusion process in its two forms, with one mapping between them.

Continuous VP SDE (score_sde): beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1],
    alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)).
Discrete DDPM: betas linear from beta_min/N to beta_max/N over N steps (1e-4..0.02 for the
defaults), alpha_bar_i = prod_{j<=i} (1 - beta_j).
Mapping: discrete step i (0-based) <-> continuous time t = (i + 1) / N; the two alpha-bars agree
to first order in 1/N at matching t. Networks take the continuous t (a tensor [B]).

All images live in model space [-1, 1] here; `to_model_space` maps [0, 1] pixels there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def to_model_space(x01: Tensor) -> Tensor:
    """[0, 1] pixels -> [-1, 1] model space (2x - 1)."""
    return x01 * 2.0 - 1.0


def to_pixel_space(xm: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] pixels (no clamping; callers decide)."""
    return (xm + 1.0) * 0.5


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample [B] tensor to broadcast against `like` [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class VPDiffusion:
    """Variance-preserving diffusion: schedule, forward sampling and eps <-> score maps."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, num_steps: int = 1000):
        if not (0 < beta_min < beta_max):
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.N = int(num_steps)
        # Discrete DDPM betas in float64 for an accurate cumulative product.
        self.discrete_betas = torch.linspace(beta_min / self.N, beta_max / self.N, self.N,
                                             dtype=torch.float64)
        self.discrete_alpha_bar = torch.cumprod(1.0 - self.discrete_betas, dim=0)

    # -- continuous form ------------------------------------------------------------------
    def beta(self, t: Tensor) -> Tensor:
        """beta(t) of the VP SDE; t: [B] -> [B]."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """log alpha_bar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2); [B] -> [B]."""
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar(t) in (0, 1]; [B] -> [B]."""
        return torch.exp(self.log_alpha_bar(t))

    def mean_coeff(self, t: Tensor) -> Tensor:
        """sqrt(alpha_bar(t)), the scale of x0 in x_t; [B] -> [B]."""
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise std sqrt(1 - alpha_bar(t)); [B] -> [B]."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def check_t(self, t: Tensor | float, batch: int, device=None) -> Tensor:
        """Broadcast a number or [B] tensor to a float [B] tensor; validates t in [0, 1]."""
        if not torch.is_tensor(t):
            t = torch.full((batch,), float(t), device=device)
        t = t.to(device=device if device is not None else t.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a number or a tensor of shape [{batch}], got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            bad = torch.nonzero(~torch.isfinite(t)).flatten().tolist()
            raise ValueError(f"t is NaN/Inf for samples {bad}; expected values in [0, 1]")
        bad = torch.nonzero((t < 0) | (t > 1)).flatten().tolist()
        if bad:
            raise ValueError(
                f"t outside [0, 1] for samples {bad} (values {t[bad].tolist()}); expected [0, 1]")
        return t.float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw x_t = sqrt(ab) x0 + sqrt(1-ab) z; x0: [B,...], t: [B] -> [B,...]."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return per_sample(self.mean_coeff(t), x0) * x0 + per_sample(self.sigma(t), x0) * noise

    def eps_to_score(self, eps: Tensor, t: Tensor) -> Tensor:
        """score = -eps / sigma(t); eps: [B,...], t: [B]."""
        return -eps / per_sample(self.sigma(t), eps)

    def score_to_eps(self, score: Tensor, t: Tensor) -> Tensor:
        """eps = -sigma(t) * score; score: [B,...], t: [B]."""
        return -score * per_sample(self.sigma(t), score)

    # -- discrete form and the mapping ------------------------------------------------------
    def t_of_step(self, i: Tensor) -> Tensor:
        """Discrete step index i (0-based) -> continuous t = (i + 1) / N."""
        return (i.to(torch.float64) + 1.0).float() / self.N

    def step_of_t(self, t: Tensor) -> Tensor:
        """Continuous t -> nearest discrete step index, clamped to [0, N-1] (long)."""
        return torch.clamp(torch.round(t * self.N) - 1, 0, self.N - 1).long()

    def alpha_bar_discrete(self, i: Tensor) -> Tensor:
        """Discrete alpha_bar at step indices i (long [B]) as float32 [B]."""
        return self.discrete_alpha_bar.to(i.device)[i.long()].float()

    def __repr__(self) -> str:
        return f"VPDiffusion(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"
