"""Reweighting functions: score norms s [B] -> per-sample noise levels t* [B].

Every reweight is continuous, monotone non-decreasing in s and bounded to [t_min, t_max]. The
plain call (`smooth=False`) rounds t* to the 1/1000 grid as the authors' code does; the smooth
call skips the rounding and softens kinks, so an attacker can differentiate through t*(x).
Normalisation always comes from a calibration (clean training norms), never from the batch:
a sample's t* does not depend on its batch companions.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import atomic_write_json, read_json
from ..registry import Registry
from .calibration import Calibration

REWEIGHTS = Registry("reweight")


@dataclass
class ReweightConfig:
    """A registered reweight name and its keyword arguments (t_min, t_max, its own)."""

    name: str = "sigmoid"
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # checked when the recipe loads: the name and every option (the calibration is the toolkit's)
        REWEIGHTS.check_options(self.name, self.kwargs, "reweight.kwargs", internal=("calibration",))


def round_to_grid(t: Tensor, num_steps: int = 1000) -> Tensor:
    """Round continuous t [B] to the k / num_steps grid (monotone, not differentiable)."""
    return torch.round(t * num_steps) / num_steps


def hard_ramp(u: Tensor) -> Tensor:
    """clamp(u, 0, 1); [B] -> [B]."""
    return u.clamp(0.0, 1.0)


def soft_ramp(u: Tensor, width: float) -> Tensor:
    """Smooth, strictly increasing stand-in for clamp(u, 0, 1), inside (0, 1); [B] -> [B].

    width * (softplus(u / width) - softplus((u - 1) / width)): its slope is
    sigmoid(u / w) - sigmoid((u - 1) / w) > 0, so gradients never vanish exactly.
    """
    def half(v: Tensor) -> Tensor:
        return width * (F.softplus(v / width) - F.softplus((v - 1.0) / width))

    # r(u) = 1 - r(1 - u); using it above u = 1/2 keeps both softplus terms small, avoiding the
    # cancellation of two huge, nearly equal numbers (which breaks monotonicity in float32).
    return torch.where(u <= 0.5, half(u), 1.0 - half(1.0 - u))


def check_level(value: float, name: str) -> float:
    """A noise level in [0, 1] as a float, or a clear error (nothing is clamped)."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"reweight {name} must be a noise level in [0, 1], got {value!r}")
    return v


def _check_norms(s: Tensor) -> Tensor:
    if not torch.is_tensor(s) or s.dim() != 1:
        shape = list(s.shape) if torch.is_tensor(s) else type(s).__name__
        raise ValueError(f"score norms must be a 1-D tensor [B], got {shape}")
    if not torch.isfinite(s).all():
        bad = torch.nonzero(~torch.isfinite(s)).flatten().tolist()
        raise ValueError(f"score norms are NaN/Inf for samples {bad}")
    return s.float()


class Reweight(nn.Module):
    """Base class: forward(s [B], smooth=False) -> t* [B] in [t_min, t_max]."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0,
                 calibration: Optional[Calibration] = None, num_steps: int = 1000,
                 smooth_width: float = 0.05):
        super().__init__()
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if smooth_width <= 0:
            raise ValueError(f"smooth_width must be > 0, got {smooth_width}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.calibration = calibration
        self.num_steps = int(num_steps)
        self.smooth_width = float(smooth_width)

    sample_specific: bool = True  # whether t* depends on the sample (False: plain DBP)
    knobs: tuple = ()  # the parameters that set the curve's range (named when it leaves [0, t_max])

    def curve(self, s: Tensor, smooth: bool) -> Tensor:
        """The unclamped reweighting curve; s [B] -> [B] (subclasses implement)."""
        raise NotImplementedError

    def curve_range(self) -> tuple:
        """(lowest, highest) value of the unclamped curve over all score norms."""
        return self.t_min, self.t_max

    def check_curve(self) -> None:
        """Refuse settings whose curve leaves [0, t_max] or never reaches t_min: the clamp would then
        give every image (or a part of them) a t* the settings do not describe, without a word."""
        knobs, (lo, hi) = self.knobs, self.curve_range()
        tol = 1e-9
        if lo >= -tol and hi <= self.t_max + tol and hi >= self.t_min - tol:
            return
        if hi <= tol or lo >= self.t_max - tol or hi < self.t_min:
            what = f"every image would get t* = {min(max(hi if hi <= tol else lo, self.t_min), self.t_max):g}"
        else:
            what = "t* would be clamped for part of the images"
        name = next((n for n in REWEIGHTS.names() if REWEIGHTS.get(n) is type(self)), type(self).__name__)
        given = ", ".join(f"{k}={getattr(self, k):g}" for k in knobs)
        raise ValueError(f"{name} reweight ({given}): its t* curve spans [{lo:g}, {hi:g}], which must lie inside "
                         f"[0, t_max={self.t_max:g}] and reach t_min={self.t_min:g}; {what}. Change "
                         f"{' / '.join(knobs)} (or t_min / t_max)")

    def forward(self, s: Tensor, smooth: bool = False) -> Tensor:
        """t*(s): s [B] -> [B], clamped to [t_min, t_max]; rounded to the grid unless smooth."""
        t = self.curve(_check_norms(s), smooth).clamp(self.t_min, self.t_max)
        if not smooth:
            t = round_to_grid(t, self.num_steps).clamp(self.t_min, self.t_max)
        return t

    def _need(self, value: Optional[float], what: str, from_cal) -> float:
        """An explicit parameter, else one read from the calibration, else a clear error."""
        if value is not None:
            return float(value)
        if self.calibration is None:
            raise ValueError(f"reweight {type(self).__name__} needs a calibration (for {what}) "
                             f"or an explicit {what}=...")
        return float(from_cal(self.calibration))

    def config(self) -> Dict[str, Any]:
        """Keyword arguments that rebuild this reweight (calibration given separately)."""
        return {"t_min": self.t_min, "t_max": self.t_max, "num_steps": self.num_steps,
                "smooth_width": self.smooth_width}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items()
                         if not isinstance(v, (list, tuple)))


@REWEIGHTS.register("constant")
class ConstantReweight(Reweight):
    """Plain DBP: the same t* (= t_base) for every sample."""

    sample_specific = False
    knobs = ("t_base",)

    def __init__(self, t_base: float = 0.1, **kw: Any):
        super().__init__(**kw)
        self.t_base = check_level(t_base, "t_base")

    def curve(self, s: Tensor, smooth: bool) -> Tensor:
        """t_base for all; s [B] -> [B]."""
        return torch.full_like(s, self.t_base)

    def curve_range(self) -> tuple:
        return self.t_base, self.t_base

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "t_base": self.t_base}


@REWEIGHTS.register("linear")
class LinearReweight(Reweight):
    """SSNI-L: t = b + t_base * ramp((s - s_low) / (s_high - s_low)).

    s_low / s_high are calibrated clean quantiles (levels q_low / q_high), never batch statistics.
    """

    knobs = ("t_base", "b")

    def __init__(self, t_base: float = 0.1, b: float = 0.005, q_low: float = 0.0,
                 q_high: float = 1.0, s_low: Optional[float] = None,
                 s_high: Optional[float] = None, **kw: Any):
        super().__init__(**kw)
        self.t_base, self.b, self.q_low, self.q_high = check_level(t_base, "t_base"), float(b), q_low, q_high
        self.s_low = self._need(s_low, "s_low", lambda c: c.quantile(q_low))
        self.s_high = self._need(s_high, "s_high", lambda c: c.quantile(q_high))
        if not self.s_high > self.s_low:
            raise ValueError(f"linear reweight needs s_high > s_low, got {self.s_high} <= "
                             f"{self.s_low} (check the calibration's quantiles)")

    def curve(self, s: Tensor, smooth: bool) -> Tensor:
        """b + t_base * ramp(normalised s); s [B] -> [B]."""
        u = (s - self.s_low) / (self.s_high - self.s_low)
        r = soft_ramp(u, self.smooth_width) if smooth else hard_ramp(u)
        return self.b + self.t_base * r

    def curve_range(self) -> tuple:
        return self.b, self.b + self.t_base  # the ramp spans [0, 1]

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "t_base": self.t_base, "b": self.b, "q_low": self.q_low,
                "q_high": self.q_high, "s_low": self.s_low, "s_high": self.s_high}


@REWEIGHTS.register("sigmoid")
class SigmoidReweight(Reweight):
    """SSNI-N: t = sigmoid((s - mu) / tau) * (t_base + b); mu (and tau by default) from the
    calibration's clean mean (std)."""

    knobs = ("t_base", "b")

    def __init__(self, t_base: float = 0.1, b: float = 0.005, tau: Optional[float] = None,
                 mu: Optional[float] = None, **kw: Any):
        super().__init__(**kw)
        self.t_base, self.b = check_level(t_base, "t_base"), float(b)
        self.mu = self._need(mu, "mu", lambda c: c.mean)
        self.tau = self._need(tau, "tau", lambda c: c.std)
        if not self.tau > 0:
            raise ValueError(f"sigmoid reweight needs tau > 0, got {self.tau}")

    def curve(self, s: Tensor, smooth: bool) -> Tensor:
        """sigmoid((s - mu) / tau) * (t_base + b); s [B] -> [B]."""
        return torch.sigmoid((s - self.mu) / self.tau) * (self.t_base + self.b)

    def curve_range(self) -> tuple:
        top = self.t_base + self.b  # the sigmoid spans (0, 1)
        return min(0.0, top), max(0.0, top)

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "t_base": self.t_base, "b": self.b, "mu": self.mu,
                "tau": self.tau}


@REWEIGHTS.register("learned")
class LearnedReweight(Reweight):
    """A monotone piecewise-linear curve through K knots with trainable heights.

    Heights v_k = t_min + (t_max - t_min) * cumsum(softmax(logits))[k] (K + 1 logits, the last
    one is headroom below t_max), so the curve is monotone and bounded for any logits. Constant
    beyond the outer knots. Build from `knots` (+ `logits`) or from a saved JSON `path`.
    """

    def __init__(self, knots: Optional[Sequence[float]] = None,
                 logits: Optional[Sequence[float]] = None, path: Optional[str] = None,
                 **kw: Any):
        if path is not None:
            saved = load_learned_json(path)
            if knots is not None or logits is not None:
                raise ValueError("give either path=... or knots/logits, not both")
            knots, logits = saved["knots"], saved["logits"]
            kw = {**{k: saved[k] for k in ("t_min", "t_max") if k in saved}, **kw}
        super().__init__(**kw)
        if knots is None:
            raise ValueError("learned reweight needs knots=[...] (increasing score norms) or "
                             "path=... (a file written by `ssni fit-reweight`)")
        k = torch.as_tensor(list(knots), dtype=torch.float32)
        if k.dim() != 1 or k.numel() < 2 or not bool((k[1:] > k[:-1]).all()):
            raise ValueError(f"knots must be >= 2 strictly increasing numbers, got {list(knots)}")
        self.register_buffer("knots", k)
        init = torch.zeros(k.numel() + 1) if logits is None else torch.as_tensor(
            list(logits), dtype=torch.float32)
        if init.shape != (k.numel() + 1,):
            raise ValueError(f"logits must have len(knots) + 1 = {k.numel() + 1} entries, "
                             f"got {init.numel()}")
        self.logits = nn.Parameter(init.clone())

    def heights(self) -> Tensor:
        """Curve values at the knots, [K], non-decreasing inside [t_min, t_max]."""
        w = torch.softmax(self.logits, dim=0)
        return self.t_min + (self.t_max - self.t_min) * torch.cumsum(w, 0)[:-1]

    def curve(self, s: Tensor, smooth: bool) -> Tensor:
        """Piecewise-linear interpolation of the heights; s [B] -> [B]."""
        v = self.heights().to(s.device)
        k = self.knots.to(s.device)
        u = (s[:, None] - k[None, :-1]) / (k[1:] - k[:-1])[None]  # [B, K-1]
        r = soft_ramp(u, self.smooth_width) if smooth else hard_ramp(u)
        return v[0] + (r * (v[1:] - v[:-1])[None]).sum(1)

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "knots": self.knots.tolist(),
                "logits": self.logits.detach().cpu().tolist()}

    def save(self, path: str | os.PathLike, extra: Optional[Dict[str, Any]] = None) -> Path:
        """Write the parameters (and optional fit details) as JSON, atomically."""
        return atomic_write_json(path, {"name": "learned", **self.config(),
                                        "heights": self.heights().detach().cpu().tolist(),
                                        **(extra or {})})


def load_learned_json(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a learned-reweight JSON (file or run directory holding reweight.json)."""
    p = path
    data = read_json(path, "learned reweight file", "reweight.json", "make one with `ssni fit-reweight`")
    if not isinstance(data, dict):
        raise ValueError(f"{p} is not a learned-reweight file (expected a JSON object)")
    if data.get("name") != "learned" or "knots" not in data or "logits" not in data:
        raise ValueError(f"{p} is not a learned-reweight file (expected name, knots, logits)")
    return data


def reweight_options(name: str) -> List[str]:
    """The keyword arguments the registered reweight `name` takes (its own and the base's)."""
    own = [k for k in inspect.signature(REWEIGHTS.get(name).__init__).parameters
           if k not in ("self", "kw")]
    base = [k for k in inspect.signature(Reweight.__init__).parameters if k not in ("self",)]
    return own + [k for k in base if k not in own and k != "calibration"]


def build_reweight(name: str, calibration: Optional[Calibration] = None,
                   **kwargs: Any) -> Reweight:
    """Create a registered reweight; the calibration supplies mu / std / quantiles.

    Example::

        >>> import torch
        >>> from ssni import build_reweight
        >>> # SSNI-N; mu and tau come from a Calibration when one is given (clean norms: mean 10, std 1)
        >>> rw = build_reweight("sigmoid", t_base=0.1, b=0.005, mu=10.0, tau=1.0)
        >>> t = rw(torch.tensor([5.0, 10.0, 30.0]))           # score norms -> t* per sample
        >>> bool(t[0] < t[1] < t[2] <= 0.105)                 # farther from clean -> more noise
        True
    """
    cls = REWEIGHTS.get(name)
    allowed = reweight_options(name)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        hint = " (renamed t_base: the base noise level)" if unknown[0] == "t_star" else ""
        raise ValueError(f"reweight {name!r} has no option {unknown[0]!r}{hint}; its options: "
                         f"{', '.join(allowed)}")
    rw = cls(calibration=calibration, **kwargs)
    rw.check_curve()
    return rw


def list_reweights() -> List[str]:
    """Registered reweight names."""
    return REWEIGHTS.names()
