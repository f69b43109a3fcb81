"""Typical-set utilities for Gaussian noise, and the TS (typical-set sampling) noise sampler.

Gaussian noise n ~ N(0, s^2 I_d) concentrates on a thin shell: ||n|| is about s*sqrt(d) with a
spread of about s/sqrt(2) whatever d. The typical set used here, with tolerance tol, is
    | ||n||^2 / (d s^2) - 1 | <= 2 tol,
and the per-sample statistic ||r||^2 / (d s^2) - 1 tells how far a residual r sits off that shell.

`TypicalSetNoise` (registered as the noise sampler "typical_set") draws noise whose radii are
pushed outside (and optionally inside) the shell, so that a network trained on it also sees noise
that is not on the shell. The off-shell draws point in isotropic (Gaussian) directions by default,
or in attack-like sign directions, or in smooth low-frequency directions. Its defaults are our own
choices: the TS paper's exact radii and mixing ratio are not public.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import NOISE_SAMPLERS

__all__ = ["expected_norm", "exact_expected_norm", "typical_shell", "typicality_statistic",
           "in_typical_set", "shell_probability", "random_directions", "noise_with_radii",
           "sign_directions", "lowfreq_directions", "DIRECTIONS", "TypicalSetNoise"]

# directions of the off-shell TS draws (see TypicalSetNoise)
DIRECTIONS = ("isotropic", "sign", "lowfreq")


def _check_dim(d: int) -> int:
    if isinstance(d, bool) or int(d) != d or d < 1:
        raise ValueError(f"dimension d must be a positive integer, got {d!r}")
    return int(d)


def _check_tol(tol: float) -> float:
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return float(tol)


def expected_norm(d: int, sigma: float = 1.0) -> float:
    """The shell radius s*sqrt(d) of N(0, s^2 I_d) noise (the large-d value of E||n||)."""
    return float(sigma) * math.sqrt(_check_dim(d))


def exact_expected_norm(d: int, sigma: float = 1.0) -> float:
    """E||n|| exactly: s*sqrt(2)*Gamma((d+1)/2)/Gamma(d/2) (the chi distribution's mean)."""
    d = _check_dim(d)
    return float(sigma) * math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


def typical_shell(d: int, sigma: float = 1.0, tol: float = 0.05) -> Tuple[float, float]:
    """Radii (r_lo, r_hi) of the typical shell with tolerance tol: | r^2/(d s^2) - 1 | <= 2 tol."""
    d, tol = _check_dim(d), _check_tol(tol)
    lo = float(sigma) * math.sqrt(d * max(0.0, 1.0 - 2.0 * tol))
    hi = float(sigma) * math.sqrt(d * (1.0 + 2.0 * tol))
    return lo, hi


def _per_sample_sigma(sigma: float | Tensor, b: int, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64, device=like.device)
    if s.dim() == 0:
        s = s.expand(b)
    if s.shape != (b,):
        raise ValueError(f"sigma must be a number or a tensor of shape [{b}], got {tuple(s.shape)}")
    if not (s > 0).all():
        raise ValueError(f"sigma must be > 0, got {s.tolist()}")
    return s


def typicality_statistic(residual: Tensor, sigma: float | Tensor) -> Tensor:
    """Per-sample ||r||^2 / (d s^2) - 1; residual: [B, ...] (d = numel per sample) -> [B].

    About N(0, 2/d) for Gaussian residuals; adversarial residuals drift away from 0.
    """
    if residual.dim() < 2:
        raise ValueError(f"residual must be [B, ...] with a batch dimension, got {list(residual.shape)}")
    flat = residual.detach().flatten(1).double()
    d = flat.shape[1]
    s = _per_sample_sigma(sigma, flat.shape[0], flat)
    return (flat.pow(2).sum(1) / (d * s * s) - 1.0).float()


def in_typical_set(residual: Tensor, sigma: float | Tensor, tol: float = 0.05) -> Tensor:
    """Bool [B]: does each residual [B, ...] lie in the typical set (tolerance tol) of N(0, s^2 I)?"""
    return typicality_statistic(residual, sigma).abs() <= 2.0 * _check_tol(tol)


def shell_probability(d: int, tol: float = 0.05) -> float:
    """Exact P(n in the typical set, tolerance tol) for n ~ N(0, s^2 I_d): a chi-square(d) mass."""
    d, tol = _check_dim(d), _check_tol(tol)
    k = torch.tensor(d / 2.0, dtype=torch.float64)
    hi = torch.special.gammainc(k, torch.tensor(d * (1 + 2 * tol) / 2.0, dtype=torch.float64))
    lo = torch.special.gammainc(k, torch.tensor(d * max(0.0, 1 - 2 * tol) / 2.0, dtype=torch.float64))
    return float(hi - lo)


def random_directions(shape: Sequence[int], generator: Optional[torch.Generator] = None,
                      device=None) -> Tensor:
    """Unit vectors per sample, uniform on the sphere: shape [B, ...] -> same shape."""
    g = torch.randn(tuple(shape), generator=generator, device=device)
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def noise_with_radii(radii: Tensor, shape: Sequence[int],
                     generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Noise whose per-sample norm is radii * sqrt(d); radii: [B] (relative to sqrt(d))."""
    shape = tuple(shape)
    d = math.prod(shape[1:])
    u = random_directions(shape, generator, device)
    return u * (radii.to(u) * math.sqrt(d)).view(-1, *([1] * (len(shape) - 1)))


def _unit(v: Tensor) -> Tensor:
    """v [B, ...] scaled to unit L2 norm per sample."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def _check_factor(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _image_shape(shape: Tuple[int, ...], what: str) -> Tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{what} directions need image shapes [B, C, H, W], got {list(shape)}")
    return shape  # type: ignore[return-value]


def sign_directions(shape: Sequence[int], block: int = 1, generator: Optional[torch.Generator] = None,
                    device=None) -> Tensor:
    """Unit vectors of random signs, every entry +-1/sqrt(d): shape [B, ...] -> same shape.

    With block > 1 (images [B,C,H,W] only) one sign covers a block x block square, as in
    attacks with a coarse grid; every entry still has the same magnitude.
    """
    shape, block = tuple(shape), _check_factor(block, "sign block")
    if block == 1:
        coarse = torch.randint(0, 2, shape, generator=generator, device=device)
    else:
        b, c, h, w = _image_shape(shape, "blockwise sign")
        coarse = torch.randint(0, 2, (b, c, -(-h // block), -(-w // block)), generator=generator,
                               device=device)
        coarse = coarse.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :h, :w]
    signs = coarse.float() * 2.0 - 1.0
    return signs / math.sqrt(math.prod(shape[1:]))


def lowfreq_directions(shape: Sequence[int], factor: int = 4, generator: Optional[torch.Generator] = None,
                       device=None) -> Tensor:
    """Unit vectors of smooth noise: Gaussian at 1/factor resolution, bilinear up; [B,C,H,W] -> same."""
    b, c, h, w = _image_shape(tuple(shape), "lowfreq")
    factor = _check_factor(factor, "lowfreq factor")
    g = torch.randn((b, c, -(-h // factor), -(-w // factor)), generator=generator, device=device)
    return _unit(F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False))


def _range(value: Sequence[float], name: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers [low, high], got {value!r}") from None
    if not (0 < lo <= hi):
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi


@NOISE_SAMPLERS.register("typical_set")
class TypicalSetNoise:
    """TS noise: per-sample radii drawn off the typical shell, in a chosen family of directions.

    Radii are relative to sqrt(d), so 1.0 is the shell of unit-std noise. Each sample is, with
    probability `off_shell_fraction`, moved off the shell; an off-shell sample goes inside (radius
    ~ U(inner_range)) with probability `inner_fraction`, else outside (radius ~ U(outer_range)),
    and its norm is exactly radius * sqrt(d). The other samples are ordinary N(0, I) draws.
    Call: (shape, generator, device) -> [B, ...].

    `direction` of the off-shell draws: "isotropic" (a Gaussian draw rescaled, the default),
    "sign" (random +-1 per entry, or per `sign_block` x `sign_block` square: attack-like), or
    "lowfreq" (Gaussian at 1/`lowfreq_factor` resolution, bilinear up to the image size). The
    last two need image shapes [B,C,H,W] (sign with block 1 takes any [B, ...]); on-shell draws
    stay Gaussian whatever the direction, and "isotropic" draws exactly what earlier versions did.

    Defaults (our own; the paper's values are not public): half the samples off the shell,
    outside only, just outside: radius ratio U(1.02, 1.10). At d = 1600 (a 40x40 grey patch) the
    Gaussian radius ratio has a spread of about 0.018, so 1.02 is one spread out. tools/ts_study.py
    chose these: of the settings it tried they cost the least clean PSNR (none within the interval
    for a small DnCNN, 0.04 dB for DnCNN-17) and gained a few hundredths of a dB under attack
    (U(1.05, 1.30), the earlier default, cost 0.13-0.14 dB clean).
    """

    def __init__(self, off_shell_fraction: float = 0.5, outer_range: Sequence[float] = (1.02, 1.10),
                 inner_range: Sequence[float] = (0.75, 0.95), inner_fraction: float = 0.0,
                 direction: str = "isotropic", sign_block: int = 1, lowfreq_factor: int = 4):
        for name, v in (("off_shell_fraction", off_shell_fraction), ("inner_fraction", inner_fraction)):
            if not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown TS direction {direction!r}; valid choices: {', '.join(DIRECTIONS)}")
        self.off_shell_fraction = float(off_shell_fraction)
        self.inner_fraction = float(inner_fraction)
        self.outer_range = _range(outer_range, "outer_range")
        self.inner_range = _range(inner_range, "inner_range")
        self.direction = direction
        self.sign_block = _check_factor(sign_block, "sign_block")
        self.lowfreq_factor = _check_factor(lowfreq_factor, "lowfreq_factor")

    def directions(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                   device=None) -> Tensor:
        """Unit directions [B, ...] of this sampler's `direction` family (for its off-shell draws)."""
        if self.direction == "sign":
            return sign_directions(shape, self.sign_block, generator, device)
        if self.direction == "lowfreq":
            return lowfreq_directions(shape, self.lowfreq_factor, generator, device)
        return random_directions(shape, generator, device)

    def draw(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
             device=None) -> Tuple[Tensor, Tensor]:
        """Noise [B, ...] and its kind per sample [B] (0 on shell, 1 outside, 2 inside)."""
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be [B, ...] with a batch dimension, got {list(shape)}")
        if self.direction == "lowfreq" or (self.direction == "sign" and self.sign_block > 1):
            _image_shape(shape, f"{self.direction!r}")  # fail before drawing anything
        b, d = shape[0], math.prod(shape[1:])
        g = torch.randn(shape, generator=generator, device=device)
        # three uniforms per sample: off-shell?, inside?, where in the range
        u = torch.rand(b, 3, generator=generator, device=device)
        off = u[:, 0] < self.off_shell_fraction
        inside = off & (u[:, 1] < self.inner_fraction)
        outside = off & ~inside
        lo = torch.where(inside, self.inner_range[0], self.outer_range[0]).to(g)
        hi = torch.where(inside, self.inner_range[1], self.outer_range[1]).to(g)
        target = (lo + (hi - lo) * u[:, 2]) * math.sqrt(d)
        kind = outside.long() + 2 * inside.long()
        view = (-1, *([1] * (len(shape) - 1)))
        if self.direction != "isotropic":
            # drawn after the isotropic stream, so on-shell samples equal the default's draws
            u_off = self.directions(shape, generator, device).to(g)
            return torch.where(off.view(view), u_off * target.view(view), g), kind
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = torch.where(off, target / norm, torch.ones_like(norm))
        return g * scale.view(view), kind

    def __call__(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                 device=None) -> Tensor:
        """Unit-std-like TS noise of `shape` [B, ...]."""
        return self.draw(shape, generator, device)[0]

    def __repr__(self) -> str:
        return (f"TypicalSetNoise(off_shell_fraction={self.off_shell_fraction}, "
                f"outer_range={self.outer_range}, inner_range={self.inner_range}, "
                f"inner_fraction={self.inner_fraction}, direction={self.direction!r}, "
                f"sign_block={self.sign_block}, lowfreq_factor={self.lowfreq_factor})")
