"""The Purifier: diffuse each image to its own t*, run the reverse process back to 0.

Cost: each stage's samples are ordered by their step counts and the grids are end-aligned, so at
every step the samples that still have a step left form a prefix of the batch; the network runs on
that prefix only. Total work is the sum of the samples' own steps, not B x the largest.

Randomness: every sample draws from its own stream seeded by its own seed (noise.py), so a sample
gives the same result alone or in any batch, and a run repeats bit for bit.

Gradients: chosen per call (grads.py). In "full" mode every reverse step is an autograd node,
checkpointed when `checkpoint` is on and autograd is recording, so activation memory stays at one
step's worth whatever the number of steps; the recomputation gets the step's saved noise tensor as
an input, so it reuses the same noise. Nothing here turns autograd off on its own.

Gradient w.r.t. t* (when t* itself requires grad, e.g. SSNI's smooth reweight under an adaptive
attack): the step grid is discrete, so t* enters the value only through its rounded grid. The
gradient is passed straight through the forward diffusion's coefficients sqrt(ab), sqrt(1 - ab)
of the continuous VP process at t*: the value is unchanged, and an attacker can still push t*(x).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..diffusion import per_sample, to_model_space, to_pixel_space
from ..images import check_images
from ..seeding import check_seeds, draw_seeds
from .grads import GRAD_MODES
from .noise import NoiseStream
from .samplers import Plan, Sampler, build_sampler


class Purifier(nn.Module):
    """Diffusion purification with a per-sample t*.

    forward(x [B,C,H,W] in [0,1], t_star float | Tensor[B] in [0,1], seeds=None, generator=None,
    grad=None) -> [B,C,H,W] in [0,1]. Seeds: LongTensor[B], one per sample; else per-sample seeds
    are drawn from `generator` (or torch's global RNG). grad: "full" | "bpda" (None: this
    purifier's default). `nfe_last` / `calls_last`: network evaluations in sample-steps / batched
    network calls of the last forward. The score network is put, and kept, in eval mode (see
    `train`). `options` are the sampler's own (e.g. steps for ddpm, dt for diffpure); one the
    sampler does not take is an error listing those it does. `trajectory` (same arguments) returns
    the image after every reverse step, for losses taken along the way (DiffAttack-style).
    """

    def __init__(self, score_model: nn.Module, sampler: str | Sampler = "diffpure", *,
                 grad: str = "full", checkpoint: bool = True, progress: bool = False,
                 **options: Any):
        super().__init__()
        for attr in ("diffusion", "input_shape"):
            if not hasattr(score_model, attr):
                raise ValueError(f"score_model must be an EpsModel (it has no .{attr}); "
                                 f"got {type(score_model).__name__}")
        self.model = score_model
        if isinstance(sampler, Sampler):
            if any(v is not None for v in options.values()):
                raise ValueError("options apply to a sampler given by name, not to a Sampler object")
            self.sampler = sampler
        else:
            self.sampler = build_sampler(sampler, **options)
        self.sampler_name = sampler if isinstance(sampler, str) else type(sampler).__name__
        GRAD_MODES.get(grad)  # unknown modes fail here, listing the choices
        self.grad = grad
        self.checkpoint = bool(checkpoint)
        self.progress = bool(progress)
        self.nfe_last = 0
        self.calls_last = 0
        self.model.eval()

    def train(self, mode: bool = True) -> "Purifier":
        """Set training mode on the module, but keep the score network in eval mode.

        Why: dropout in the score network would add randomness that the per-sample seeds do not
        control, breaking reproducibility and the alone-equals-batched guarantee.
        """
        super().train(mode)
        self.model.eval()
        return self

    @property
    def diffusion(self):
        """The score network's VP process."""
        return self.model.diffusion

    # -- validation --------------------------------------------------------------------------
    def check_inputs(self, x: Tensor, t_star: Tensor | float) -> Tensor:
        """Validate images and t*; returns t* as float [B] on x's device."""
        check_images(x, self.model.input_shape)
        return self.diffusion.check_t(t_star, x.shape[0], device=x.device)

    def resolve_seeds(self, batch: int, seeds: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> list:
        """Per-sample seeds: given ones (validated), else drawn from generator / global RNG."""
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either seeds or generator, not both")
            return check_seeds(seeds, batch)
        return draw_seeds(batch, generator).tolist()

    # -- public entry points -----------------------------------------------------------------
    def forward(self, x: Tensor, t_star: Tensor | float, seeds: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, grad: Optional[str] = None) -> Tensor:
        """Purify x [B,C,H,W] in [0,1] at per-sample t* -> [B,C,H,W] in [0,1]."""
        t = self.check_inputs(x, t_star)
        seed_list = self.resolve_seeds(x.shape[0], seeds, generator)
        mode = GRAD_MODES.get(grad or self.grad)
        return mode(self, x, t, seed_list)

    def diffuse(self, x: Tensor, t_star: Tensor | float, seeds: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Forward diffusion of the first stage only: x [B,C,H,W] in [0,1] -> x_t* in model space."""
        t = self.check_inputs(x, t_star)
        seed_list = self.resolve_seeds(x.shape[0], seeds, generator)
        stream = NoiseStream(seed_list, x.shape[1:], x.device, x.dtype)
        sampler, ts = self.sampler.stages(t)[0]
        plan = sampler.plan(self.diffusion, ts.detach().double().cpu())
        return self._diffuse(sampler, plan, to_model_space(x), stream)

    def _t_cpu(self, t_star: Tensor | float, batch: Optional[int]) -> Tensor:
        if batch is None:
            batch = t_star.numel() if torch.is_tensor(t_star) and t_star.dim() > 0 else 1
        return self.diffusion.check_t(torch.as_tensor(t_star).detach().cpu(), batch, device="cpu")

    def alpha_bar_start(self, t_star: Tensor | float, batch: Optional[int] = None) -> Tensor:
        """alpha_bar at which the first stage's forward diffusion ends, per sample (float64 [B])."""
        t = self._t_cpu(t_star, batch)
        sampler, ts = self.sampler.stages(t)[0]
        a, _ = sampler.start_coeffs(self.diffusion, sampler.plan(self.diffusion, ts.double()))
        return a * a

    def steps_per_sample(self, t_star: Tensor | float, batch: Optional[int] = None) -> np.ndarray:
        """Network evaluations each sample needs (summed over stages), int64 [B]."""
        t = self._t_cpu(t_star, batch)
        total = np.zeros(t.shape[0], dtype=np.int64)
        for sampler, ts in self.sampler.stages(t):
            total += sampler.plan(self.diffusion, ts.double()).lengths
        return total

    # -- the engine ----------------------------------------------------------------------------
    def trajectory(self, x: Tensor, t_star: Tensor | float, seeds: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None, grad: Optional[str] = None) -> List[Tensor]:
        """The image after every global reverse step: x [B,C,H,W] in [0,1] -> S tensors [B,C,H,W] in [0,1].

        Step s is the s-th pass of the reverse loop over all stages (S = the sum over stages of the
        largest per-sample step count, at least 1). Grids are end-aligned, so at step s a sample
        with fewer steps than the largest may not have started: it then holds its forward-diffused
        image (clamped to [0,1], noise and all), which is its true state at that point; a sample
        with t* = 0 holds its input. Rows are in the input's order; the last entry is exactly
        forward's output with the same seeds and grad mode. Each entry is part of the autograd
        graph (S extra images of memory beside the checkpointed steps' own).
        """
        t = self.check_inputs(x, t_star)
        seed_list = self.resolve_seeds(x.shape[0], seeds, generator)
        record: List[Tensor] = []
        GRAD_MODES.get(grad or self.grad)(self, x, t, seed_list, record=record)
        return record

    def run(self, x: Tensor, t: Tensor, seeds: Sequence[int], record: Optional[List[Tensor]] = None) -> Tensor:
        """Purify with autograd recording as the caller set it (the "full" mode's body).

        x: [B,C,H,W] in [0,1] (validated), t: float [B] (validated), seeds: B ints. record: a list
        that receives the image after every global reverse step (see `trajectory`), [B,C,H,W] each.
        """
        stream = NoiseStream(seeds, x.shape[1:], x.device, x.dtype)
        ref = to_model_space(x)
        xm = ref
        use_ckpt = self.checkpoint and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.model.parameters()))
        steps = np.zeros(x.shape[0], dtype=np.int64)
        calls = 0
        states: Optional[List[Tensor]] = [] if record is not None else None
        stages = self.sampler.stages(t)
        for k, (sampler, ts) in enumerate(stages):
            plan = sampler.plan(self.diffusion, ts.detach().double().cpu())
            xm = self._diffuse(sampler, plan, xm, stream, ts if ts.requires_grad else None)
            xm = self._reverse(sampler, plan, xm, ref, stream, use_ckpt, states)
            if k < len(stages) - 1:  # each stage hands an image on to the next
                xm = xm.clamp(-1.0, 1.0)
            steps += plan.lengths
            calls += plan.max_len
        self.nfe_last = int(steps.sum())
        self.calls_last = calls
        untouched = steps == 0
        keep = torch.as_tensor(untouched, device=x.device)

        def finish(state: Tensor) -> Tensor:
            out = to_pixel_space(state).clamp(0.0, 1.0)
            if untouched.any():  # t* = 0 (or below one step): return the input exactly
                out = torch.where(per_sample(keep, x).bool(), x, out)
            return out

        out = finish(xm)
        if record is not None:
            # the last state is xm itself, so the final entry is `out` (with no reverse step at
            # all, `out` is the only entry)
            record.extend(finish(s) for s in states[:-1])
            record.append(out)
        return out

    def _diffuse(self, sampler: Sampler, plan: Plan, xm: Tensor, stream: NoiseStream,
                 t_grad: Optional[Tensor] = None) -> Tensor:
        """x_t = a x + s z at each sample's grid start; t_grad [B]: t* carrying a gradient."""
        a, s = sampler.start_coeffs(self.diffusion, plan)
        a, s = a.to(xm), s.to(xm)
        if t_grad is not None:  # straight-through: value from the grid, slope from the VP SDE
            tc = t_grad.to(xm.dtype).clamp(min=1.0 / self.diffusion.N)  # sigma'(0) is infinite
            ac, sc = self.diffusion.mean_coeff(tc), self.diffusion.sigma(tc)
            a, s = a + (ac - ac.detach()), s + (sc - sc.detach())
        z = stream.draw()
        return per_sample(a, xm) * xm + per_sample(s, xm) * z

    def _reverse(self, sampler: Sampler, plan: Plan, xm: Tensor, ref: Tensor,
                 stream: NoiseStream, use_ckpt: bool, states: Optional[List[Tensor]] = None) -> Tensor:
        """Reverse every sample from its grid start to 0; states (if given) gets the model-space
        batch, in input order, after every global step (the last one is the returned tensor)."""
        big_l = plan.max_len
        if big_l == 0:
            return xm
        n = xm.shape[0]
        order = np.argsort(-plan.lengths, kind="stable")
        identity = bool((order == np.arange(n)).all())
        lengths = plan.lengths[order]
        # active[g]: samples with a step left at global step g (a prefix of the sorted batch)
        active = [(int((lengths >= big_l - g).sum())) for g in range(big_l)]
        dev = xm.device
        perm = torch.as_tensor(order, device=dev)
        grid = plan.grid.index_select(0, torch.as_tensor(order)).to(dev)
        xp = xm if identity else xm.index_select(0, perm)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=dev)
        refp = None
        if sampler.needs_reference:
            refp = ref if identity else ref.index_select(0, perm)
        it = range(big_l)
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"purify ({type(sampler).__name__})", leave=False)
        for g in it:
            a = active[g]
            noise = stream.draw(order[:a]) if sampler.stochastic else None
            xa = xp if a == n else xp[:a]
            ra = None if refp is None else (refp if a == n else refp[:a])
            args = (self.model, xa, grid[:a, g], grid[:a, g + 1], noise, ra)
            if use_ckpt:
                new = _checkpoint(sampler.step, *args, use_reentrant=False)
            else:
                new = sampler.step(*args)
            xp = new if a == n else torch.cat([new, xp[a:]], 0)
            if states is not None and g < big_l - 1:
                states.append(xp if identity else xp.index_select(0, inv))
        out = xp if identity else xp.index_select(0, inv)
        if states is not None:
            states.append(out)
        return out

    def extra_repr(self) -> str:
        return f"sampler={self.sampler!r}, grad={self.grad!r}, checkpoint={self.checkpoint}"
