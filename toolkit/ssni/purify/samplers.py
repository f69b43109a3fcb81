"""Reverse-process samplers for purification, each with a per-sample t* (a tensor [B]).

A sampler turns each sample's t* into its own integer step grid (a `Plan`), says how to diffuse a
clean image to the top of that grid, and how to take one reverse step on a sub-batch. The
purifier (purifier.py) owns the loop: it evaluates the network only on the samples that still have
a step left, so the cost follows the sum of the samples' own step counts.

Registered: `diffpure` (reverse VP SDE, Euler-Maruyama at a fixed dt), `vpode` (the VP SDE's
probability-flow ODE, Euler at the same fixed dt: deterministic given the forward diffusion),
`ddpm` (ancestral, per-sample discrete grid), `ddim` (same grid, eta = 0), `gdmp` (ddpm steps
guided towards the input), `gns` (several diffuse-then-reverse stages).

DiffBreak's `ddpm_ode` is not registered: it is not DDIM. It takes the DDPM posterior-mean step
with the network's eps halved and no noise (a discretised probability flow on the DDPM chain),
while our `ddim` steps x0 and eps to the next alpha_bar; an alias would claim a parity we lack.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion import VPDiffusion, per_sample
from ..registry import Registry, UnknownOptionError  # noqa: F401  (re-exported: ssni.purify)
from ..sampling import ddim_step, ddpm_mean_var

SAMPLERS = Registry("sampler")


@dataclass
class Plan:
    """Per-sample integer step grids, end-aligned so every sample reaches 0 at the last step.

    grid: long [B, L+1]; sample b's own grid fills columns L - lengths[b] .. L (earlier columns
    repeat its first value and are never used). lengths: int64 [B] reverse steps per sample.
    """

    grid: Tensor
    lengths: np.ndarray

    @property
    def max_len(self) -> int:
        """L, the largest per-sample step count."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    def start(self) -> Tensor:
        """Each sample's first grid value (where its forward diffusion ends); long [B]."""
        cols = torch.as_tensor(self.max_len - self.lengths, dtype=torch.long)
        return self.grid.gather(1, cols[:, None])[:, 0]


def _end_aligned(grids: List[List[int]]) -> Plan:
    """Stack per-sample descending grids (each ending at its final value) into a Plan."""
    lengths = np.array([len(g) - 1 for g in grids], dtype=np.int64)
    width = int(lengths.max()) + 1 if len(grids) else 1
    rows = [[g[0]] * (width - len(g)) + list(g) for g in grids]
    return Plan(grid=torch.tensor(rows, dtype=torch.long).reshape(len(grids), width),
                lengths=lengths)


class Sampler:
    """Base class. Subclasses set `stochastic` and implement plan / start_coeffs / step."""

    stochastic: bool = True        # reverse steps consume one noise draw per sample
    needs_reference: bool = False  # step() uses the purifier's input image

    @classmethod
    def option_names(cls, **options: Any) -> List[str]:
        """The options this sampler takes (given `options`, for samplers that nest another)."""
        params = inspect.signature(cls.__init__).parameters
        return [k for k, p in params.items() if k != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]

    @classmethod
    def from_options(cls, name: str = "", **options: Any) -> "Sampler":
        """Build from options; one this sampler does not take is an error listing those it does."""
        allowed = cls.option_names(**options)
        unknown = sorted(k for k in options if k not in allowed)
        if unknown:
            raise UnknownOptionError(
                f"sampler {name or cls.__name__!r} has no option {unknown[0]!r}; its options: "
                f"{', '.join(allowed) or '(none)'}")
        return cls(**options)

    def stages(self, t_star: Tensor) -> List[Tuple["Sampler", Tensor]]:
        """(sampler, t* [B]) for each diffuse-then-reverse stage; one stage by default."""
        return [(self, t_star)]

    def plan(self, diffusion: VPDiffusion, t_star: Tensor) -> Plan:
        """Per-sample step grids for t* (float64 [B] on CPU)."""
        raise NotImplementedError

    def start_coeffs(self, diffusion: VPDiffusion, plan: Plan) -> Tuple[Tensor, Tensor]:
        """(sqrt(ab), sqrt(1 - ab)) at each sample's start, float64 [B] each."""
        raise NotImplementedError

    def step(self, model: nn.Module, x: Tensor, cur: Tensor, nxt: Tensor,
             noise: Optional[Tensor], ref: Optional[Tensor]) -> Tensor:
        """One reverse step of the active rows: x [A,C,H,W] at grid values cur -> nxt (long [A])."""
        raise NotImplementedError

    def options(self) -> Dict[str, Any]:
        """The keyword arguments that rebuild this sampler."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


class _FixedDtSampler(Sampler):
    """Continuous VP time stepped at a fixed dt: sample b takes round(t*_b / dt) steps from
    t = n_b dt to 0; grid values count dt's (DiffPure: dt = 1e-3, so t* = 0.1 is 100 steps)."""

    def __init__(self, dt: float = 1e-3):
        if not 0.0 < float(dt) <= 1.0:
            raise ValueError(f"dt must be in (0, 1], got {dt}")
        self.dt = float(dt)

    def options(self) -> Dict[str, Any]:
        return {"dt": self.dt}

    def plan(self, diffusion: VPDiffusion, t_star: Tensor) -> Plan:
        n = torch.round(t_star.double() / self.dt).long().tolist()
        return _end_aligned([list(range(k, -1, -1)) for k in n])

    def start_coeffs(self, diffusion: VPDiffusion, plan: Plan) -> Tuple[Tensor, Tensor]:
        t = plan.start().double() * self.dt
        log_ab = diffusion.log_alpha_bar(t)
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))

    def _beta_score(self, model, x: Tensor, cur: Tensor) -> Tuple[Tensor, Tensor]:
        """beta(t) [A] and the score -eps / sigma(t) [A,C,H,W] at t = cur * dt."""
        d: VPDiffusion = model.diffusion
        t = cur.to(x.dtype) * self.dt
        return d.beta(t), -model(x, t) / per_sample(d.sigma(t), x)


@SAMPLERS.register("diffpure")
class DiffPureSampler(_FixedDtSampler):
    """Reverse VP SDE by Euler-Maruyama at a fixed step dt (DiffPure: 1e-3, so t* = 0.1 is 100
    steps). Sample b takes round(t*_b / dt) steps from t = n_b dt to 0; grid values count dt's."""

    stochastic = True

    def step(self, model, x, cur, nxt, noise, ref):
        beta, score = self._beta_score(model, x, cur)
        # reverse-time drift f - g^2 score with f = -beta x / 2, g^2 = beta, stepped by -dt
        x = x + per_sample(beta * self.dt, x) * (0.5 * x + score)
        return x + per_sample(torch.sqrt(beta * self.dt), x) * noise


@SAMPLERS.register("vpode")
class VPODESampler(_FixedDtSampler):
    """Probability-flow ODE of the VP SDE, Euler at a fixed step dt (same grid as diffpure:
    t* = 0.1 with dt = 1e-3 is 100 steps). dx/dt = -beta(t)/2 (x + score), score = -eps / sigma;
    the reverse consumes no noise, so only the forward diffusion is random (DiffBreak's vpode)."""

    stochastic = False

    def step(self, model, x, cur, nxt, noise, ref):
        beta, score = self._beta_score(model, x, cur)
        # f - g^2 score / 2 with f = -beta x / 2, g^2 = beta: half the SDE's score pull, no noise
        return x + per_sample(0.5 * beta * self.dt, x) * (x + score)


class _DiscreteSampler(Sampler):
    """Per-sample grid on the discrete DDPM schedule: T_b = round(t*_b N) gives indices
    T_b - 1 .. -1 (-1 = clean data); with `steps` = n, the grid is
    unique(ceil(linspace(0, T_b, n + 1)) - 1), so a sample takes min(n, T_b) steps."""

    def __init__(self, steps: Optional[int] = None, clip: bool = True):
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be a positive integer or None (every discrete step), "
                             f"got {steps}")
        self.steps = None if steps is None else int(steps)
        self.clip = bool(clip)

    def options(self) -> Dict[str, Any]:
        return {"steps": self.steps, "clip": self.clip}

    def plan(self, diffusion: VPDiffusion, t_star: Tensor) -> Plan:
        big_t = torch.round(t_star.double() * diffusion.N).long().tolist()
        grids = []
        for tb in big_t:
            if self.steps is None or self.steps >= tb:
                grids.append(list(range(tb - 1, -2, -1)))
            else:
                g = np.unique(np.ceil(np.linspace(0.0, tb, self.steps + 1)).astype(np.int64) - 1)
                grids.append(g[::-1].tolist())
        return _end_aligned(grids)

    def start_coeffs(self, diffusion: VPDiffusion, plan: Plan) -> Tuple[Tensor, Tensor]:
        i = plan.start()
        ab = diffusion.discrete_alpha_bar[i.clamp(min=0)]
        ab = torch.where(i < 0, torch.ones_like(ab), ab)
        return torch.sqrt(ab), torch.sqrt(1.0 - ab)


@SAMPLERS.register("ddpm")
class DDPMSampler(_DiscreteSampler):
    """Ancestral DDPM steps on each sample's own grid (posterior variance, x0 clipped if clip)."""

    stochastic = True

    def step(self, model, x, cur, nxt, noise, ref):
        mean, var = ddpm_mean_var(model, x, cur, nxt, self.clip)
        std = torch.where(nxt < 0, torch.zeros_like(var), torch.sqrt(var.clamp(min=0)))
        return mean + per_sample(std, x) * noise


@SAMPLERS.register("ddim")
class DDIMSampler(_DiscreteSampler):
    """Deterministic DDIM (eta = 0) on the same per-sample grid; only the forward diffusion is random."""

    stochastic = False

    def step(self, model, x, cur, nxt, noise, ref):
        return ddim_step(model, x, cur, nxt, self.clip)


@SAMPLERS.register("gdmp")
class GDMPSampler(_DiscreteSampler):
    """DDPM steps guided towards the input image y (MSE guidance, as GDMP):
    mean <- mean - min(guidance_scale * var, 1) * (x_i - sqrt(ab_i) y), the gradient of
    0.5 ||x_i - sqrt(ab_i) y||^2 scaled by the step's variance (capped so it never overshoots). The reference is the input's
    noise-free diffused mean (our choice: no extra randomness); guidance_scale acts as the
    precision of that pull, default ours."""

    stochastic = True
    needs_reference = True

    def __init__(self, steps: Optional[int] = None, clip: bool = True,
                 guidance_scale: float = 10.0):
        super().__init__(steps=steps, clip=clip)
        if not float(guidance_scale) >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.guidance_scale = float(guidance_scale)

    def options(self) -> Dict[str, Any]:
        return {**super().options(), "guidance_scale": self.guidance_scale}

    def step(self, model, x, cur, nxt, noise, ref):
        d: VPDiffusion = model.diffusion
        mean, var = ddpm_mean_var(model, x, cur, nxt, self.clip)
        ab_i = d.alpha_bar_discrete(cur)
        # capped at 1 so a large scale on a strided grid stops at the reference, never past it
        pull = (self.guidance_scale * var).clamp(max=1.0)
        mean = mean - per_sample(pull, x) * (x - per_sample(torch.sqrt(ab_i), x) * ref)
        std = torch.where(nxt < 0, torch.zeros_like(var), torch.sqrt(var.clamp(min=0)))
        return mean + per_sample(std, x) * noise


@SAMPLERS.register("gns")
class GNSSampler(Sampler):
    """Multi-stage purification: for each stage s, diffuse the current image to s * t*_b and run
    the `inner` sampler back to 0 (stages given as multiples of each sample's t*, e.g. a gradual
    schedule (0.5, 1.0)). Other options go to the inner sampler."""

    def __init__(self, stages: Sequence[float] = (0.5, 1.0), inner: str = "ddpm",
                 **inner_options: Any):
        stages = [float(s) for s in stages]
        if not stages or any(not (0.0 <= s) for s in stages):
            raise ValueError(f"stages must be a non-empty list of multiples of t* >= 0, got {stages}")
        if inner == "gns":
            raise ValueError("gns cannot nest itself; choose inner from "
                             f"{[n for n in SAMPLERS.names() if n != 'gns']}")
        self.stage_scales = stages
        self.inner_name = inner
        self.inner = SAMPLERS.get(inner).from_options(inner, **inner_options)
        self.stochastic = self.inner.stochastic
        self.needs_reference = self.inner.needs_reference

    @classmethod
    def option_names(cls, **options: Any) -> List[str]:
        """stages and inner, plus the options of the inner sampler."""
        inner = SAMPLERS.get(options.get("inner", "ddpm"))
        return ["stages", "inner"] + [k for k in inner.option_names() if k not in ("stages", "inner")]

    def options(self) -> Dict[str, Any]:
        return {"stages": self.stage_scales, "inner": self.inner_name, **self.inner.options()}

    def stages(self, t_star: Tensor) -> List[Tuple[Sampler, Tensor]]:
        return [(self.inner, (t_star * s).clamp(0.0, 1.0)) for s in self.stage_scales]


def build_sampler(name: str, **options: Any) -> Sampler:
    """A registered sampler from its options (None means "the sampler's default"); an option the
    sampler does not take is an error that lists the ones it does."""
    return SAMPLERS.get(name).from_options(name, **{k: v for k, v in options.items() if v is not None})
