"""The score-model interface: eps-prediction from (x, t) with a per-sample t, plus a score view."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..diffusion import VPDiffusion
from ..registry import Registry

TIME_INPUTS = Registry("time input")


@TIME_INPUTS.register("t999")
def time_t999(t: Tensor, num_steps: int) -> Tensor:
    """score_sde's continuous VP models: t * (N - 1), i.e. t x 999; t [B] -> [B]."""
    return t * (num_steps - 1)


@TIME_INPUTS.register("step_index")
def time_step_index(t: Tensor, num_steps: int) -> Tensor:
    """Discrete-step models (guided-diffusion, diffusers DDPM): step i = t N - 1; t [B] -> [B].

    On the discrete grid t = (i + 1) / N this is exactly the integer i; between grid points (the
    continuous-time samplers) it is the fractional step, which sinusoidal embeddings accept.
    """
    return t * num_steps - 1.0


@TIME_INPUTS.register("step_floor")
def time_step_floor(t: Tensor, num_steps: int) -> Tensor:
    """DiffPure's SDE runner for guided-diffusion: `(t.float() * N).long()`, i.e. floor(t N); t [B] -> [B].

    On the grid t = (i + 1) / N it gives i + 1 where step_index gives i (and N at t = 1, one past the
    trained steps, as DiffPure feeds it); piecewise constant, so no gradient flows through t.
    """
    return (t.float() * num_steps).long().to(t.dtype)


class EpsModel(nn.Module):
    """The score-model contract: forward(x [B,C,H,W] in [-1,1], t [B] in [0,1]) -> eps [B,C,H,W].

    Samplers, the score norm and the defense see only this. A model owns its VP process
    (`diffusion`; discrete step i is t = (i + 1) / N) and its conventions: `time_input` names how
    continuous t becomes the network's time input (TIME_INPUTS: our U-Nets and score_sde take
    t x 999, guided-diffusion and diffusers the step index t N - 1, or floor(t N) as DiffPure's SDE
    runner feeds guided-diffusion). Public backbones sit behind
    `VPBackbone`, which also keeps the eps channels of a learn_sigma output. Subclasses set
    `in_channels`, `image_size` and `config` (the keyword arguments that rebuild them).
    """

    in_channels: int
    image_size: int
    config: Dict[str, Any]
    time_input: str = "t999"  # how continuous t becomes the network's time input (TIME_INPUTS)

    def __init__(self, diffusion: VPDiffusion | None = None):
        super().__init__()
        self.diffusion = diffusion or VPDiffusion()
        self.autocast_dtype: Optional[torch.dtype] = None
        self.channels_last = False

    def set_speed(self, precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False) -> "EpsModel":
        """Run the network in bf16 / fp16 autocast (eps returned in float32), channels_last, and/or
        compiled with torch.compile.

        Only the network call changes: the diffusion coefficients, samplers and score norm stay in
        float32 (or float64), where their maths needs the precision. Compilation marks shapes
        dynamic: with per-sample t* the active sub-batch shrinks step by step, and a static
        compile would recompile for every size. It cannot be undone on this module.
        """
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
        self.autocast_dtype = dtypes[precision]
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if compile and not self.compiled:
            self.compile(dynamic=True)  # nn.Module.compile: in place, state_dict keys unchanged
        return self

    @property
    def compiled(self) -> bool:
        """Whether set_speed(compile=True) has compiled this module (torch's own record of it)."""
        return self._compiled_call_impl is not None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """forward(x, t), under the precision and memory format chosen by `set_speed`."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return super().__call__(x, t)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = super().__call__(x, t)
        return out.float()

    def network_time(self, t: Tensor) -> Tensor:
        """The network's own time input for continuous times t [B] (this model's TIME_INPUTS rule)."""
        return TIME_INPUTS.get(self.time_input)(t, self.diffusion.N)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Score grad_x log p_t(x) = -eps(x, t) / sigma(t); x: [B,C,H,W], t: [B]."""
        return self.diffusion.eps_to_score(self(x, t), t)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) that the network was built for."""
        return (self.in_channels, self.image_size, self.image_size)

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if x [B,C,H,W] does not fit the network."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"score network was built for images of shape [B, {self.in_channels}, "
                f"{self.image_size}, {self.image_size}], got {list(x.shape)}")
