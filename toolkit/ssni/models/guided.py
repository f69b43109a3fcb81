"""guided-diffusion's ImageNet U-Net (its `UNetModel`), rebuilt here, and the "guided_diffusion" checkpoint format.

The public 256x256 unconditional ImageNet model (`256x256_diffusion_uncond.pt`, used by DiffPure and
SSNI on ImageNet) is a plain fp32 state dict: 552.8M parameters in 566 entries. `GuidedUNet` has the
same parameter names and shapes, so that file loads with strict=True; the forward pass computes the
same function (checked against the original at relative L2 <= 1e-4 in float32).

Conventions of that model: input in [-1, 1]; the time input is the DDPM step index 0..N-1 (possibly
fractional); the sinusoidal time embedding is cat[cos, sin] with frequencies 10000^(-k / half); with
learn_sigma the output has 6 channels, eps first. Its linear schedule (betas 0.1/N .. 20/N) is our
VPDiffusion(0.1, 20, N).

Two conventions differ between the programs that run it, and are options here:
- time input: guided-diffusion's own sampler (and DiffPure's DDPM runner) feeds step i at t = (i + 1) / N,
  i.e. t N - 1 (time_input="step_index", the default); DiffPure's SDE runner feeds `(t * N).long()`,
  floor(t N) (time_input="step_floor"), one step later on the grid.
- precision: use_fp16=True makes the original run its torso in float16 (`convert_to_fp16`: the torso's
  convolutions in fp16, norms and softmax in fp32); DiffPure's ImageNet config sets it. precision="fp16"
  does the same here (0 difference to the original in fp16, tools/check_guided_original.py); the default
  "fp32" runs the (fp32-stored) weights in float32, about 3e-3 relative L2 from the fp16 original.
  use_fp16 itself switches nothing here.

Flags use guided-diffusion's names and accept its string forms, e.g.
    load_pretrained("256x256_diffusion_uncond.pt", "guided_diffusion")            # the defaults
    load_pretrained(path, "guided_diffusion", attention_resolutions="32,16,8", channel_mult="")
    load_pretrained(path, "guided_diffusion", time_input="step_floor", precision="fp16")  # as DiffPure's SDE runner
attention_resolutions are image resolutions (32 = the 32x32 level), as on guided-diffusion's
command line. use_checkpoint only changes how the original runs (its own gradient checkpointing); our
purifier and score norm checkpoint on their own.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..diffusion import VPDiffusion
from .layers import level_sizes, resample
from .pretrained import PRETRAINED_FORMATS, VPBackbone, load_state_checked, torch_file

# -- building blocks -------------------------------------------------------------------------------


class GroupNormF32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 whatever the input dtype; [B,C,...] -> same."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        # the statistics are unstable in half precision; the original normalises in float32 too
        return super().forward(x.float()).to(x.dtype)


def guided_timestep_embedding(steps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """guided-diffusion's sinusoidal embedding cat[cos, sin] of step indices; steps [B] -> [B, dim]."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=steps.device)
    angles = steps.float()[:, None] * torch.exp(k * (-math.log(max_period) / half))[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zeroed(module: nn.Module) -> nn.Module:
    """The module with every parameter set to zero (output layers start as the identity residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GuidedResBlock(nn.Module):
    """Residual block with a time embedding (FiLM scale/shift or additive); optional up/down resampling.

    forward(x [B,C_in,H,W], emb [B,E]) -> [B,C_out,H',W'] (H' = 2H up, H/2 down). Submodule names
    (in_layers, emb_layers, out_layers, skip_connection) follow the original's state dict.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, resample: Optional[str] = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        # Sequential indices are part of the parameter names: in_layers.0 norm, .2 conv; emb_layers.1;
        # out_layers.0 norm, .3 conv
        self.in_layers = nn.Sequential(GroupNormF32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNormF32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B,C_in,H,W], emb [B,E] -> [B,C_out,H',W']."""
        norm_in, act_in, conv_in = self.in_layers
        # resampling sits between the activation and the convolution, on both branches
        h = conv_in(resample(act_in(norm_in(x)), self.resample))
        x = resample(x, self.resample)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm_out(h) * (1.0 + scale) + shift
        else:
            h = norm_out(h + e)
        return self.skip_connection(x) + conv_out(drop(act_out(h)))


class GuidedAttention(nn.Module):
    """Multi-head self-attention over positions, residual; forward(x [B,C,H,W]) -> [B,C,H,W].

    qkv and proj_out are 1x1 Conv1d layers as in the original. The channel layout of qkv differs
    between its two variants: legacy (heads outermost: [head][q|k|v][c]) and the new order
    ([q|k|v][head][c], use_new_attention_order).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 new_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"attention at {channels} channels: num_head_channels {num_head_channels} "
                             f"does not divide it")
        else:
            heads = channels // num_head_channels
        if heads <= 0 or channels % heads:
            raise ValueError(f"attention at {channels} channels: {heads} heads do not divide it")
        self.num_heads = heads
        self.new_order = new_order
        self.norm = GroupNormF32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x [B,C,H,W] -> [B,C,H,W]."""
        b, c, hgt, wid = x.shape
        flat = x.reshape(b, c, hgt * wid)
        qkv = self.qkv(self.norm(flat))
        if qkv.dtype == torch.float16:
            out = self._attention_fp16(qkv)
        else:
            layout = "b (three nh c) t" if self.new_order else "b (nh three c) t"
            q, k, v = rearrange(qkv, f"{layout} -> three b nh t c", three=3, nh=self.num_heads)
            # softmax(q k^T / sqrt(c)) v, the same function as the original's two c^(-1/4) scalings
            out = rearrange(F.scaled_dot_product_attention(q, k, v), "b nh t c -> b (nh c) t")
        return (flat + self.proj_out(out)).reshape(b, c, hgt, wid)

    def _attention_fp16(self, qkv: Tensor) -> Tensor:
        """qkv [B, 3C, T] in float16 -> [B, C, T] with the original's own arithmetic and shapes (q and k
        scaled by c^(-1/4) in fp16, the softmax in float32), as guided-diffusion's fp16 torso computes it."""
        bs, width, length = qkv.shape
        heads = self.num_heads
        ch = width // (3 * heads)
        scale = 1 / math.sqrt(math.sqrt(ch))
        if self.new_order:  # QKVAttention
            q, k, v = qkv.chunk(3, dim=1)
            weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * heads, ch, length),
                                  (k * scale).view(bs * heads, ch, length))
            v = v.reshape(bs * heads, ch, length)
        else:  # QKVAttentionLegacy
            q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
            weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class ConvDownsample(nn.Module):
    """Stride-2 3x3 convolution (the original's Downsample with conv; parameter `op`); [B,C,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C,H/2,W/2]."""
        return self.op(x)


class ConvUpsample(nn.Module):
    """Nearest x2 then a 3x3 convolution (the original's Upsample with conv; parameter `conv`); [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C,2H,2W]."""
        return self.conv(resample(x, "up"))


class EmbedStage(nn.ModuleList):
    """Layers applied in order; residual blocks also get the time embedding. forward(h [B,C,H,W], emb [B,E])."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        """h [B,C,H,W], emb [B,E] -> [B,C',H',W']."""
        for layer in self:
            h = layer(h, emb) if isinstance(layer, GuidedResBlock) else layer(h)
        return h


# -- the U-Net ---------------------------------------------------------------------------------------


class GuidedUNet(nn.Module):
    """guided-diffusion's UNetModel (2-D); forward(x [B,C,H,W], steps [B], y [B] | None) -> [B,out_channels,H,W].

    attention_ds are downsample rates (1 = full resolution, 8 = the level at H/8). num_classes
    adds the class embedding `label_emb` (then y, class indices [B], is required).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_ds: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), num_classes: Optional[int] = None,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(c_in: int, c_out: int, resample: Optional[str] = None) -> GuidedResBlock:
            return GuidedResBlock(c_in, emb_dim, dropout, c_out, use_scale_shift_norm, resample)

        def attn(c: int, heads: int) -> GuidedAttention:
            return GuidedAttention(c, heads, num_head_channels, use_new_attention_order)

        widths = [int(m * model_channels) for m in channel_mult]
        ch = widths[0]
        self.input_blocks = nn.ModuleList([EmbedStage([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_widths, ds = [ch], 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res(ch, width)]
                ch = width
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedStage(layers))
                skip_widths.append(ch)
            if level < len(widths) - 1:
                down = res(ch, ch, "down") if resblock_updown else ConvDownsample(ch)
                self.input_blocks.append(EmbedStage([down]))
                skip_widths.append(ch)
                ds *= 2
        self.middle_block = EmbedStage([res(ch, ch), attn(ch, num_heads), res(ch, ch)])
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), widths[level])]
                ch = widths[level]
                if ds in attention_ds:
                    layers.append(attn(ch, up_heads))
                if level and i == num_res_blocks:  # each level but the top ends by upsampling
                    layers.append(res(ch, ch, "up") if resblock_updown else ConvUpsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedStage(layers))
        self.out = nn.Sequential(GroupNormF32(ch), nn.SiLU(), _zeroed(nn.Conv2d(widths[0], out_channels, 3, padding=1)))
        self.torso_dtype: Optional[torch.dtype] = None  # torch.float16 after convert_to_fp16()

    def convert_to_fp16(self) -> "GuidedUNet":
        """guided-diffusion's convert_to_fp16 (what its use_fp16=True runs): the convolutions of the
        torso (input_blocks, middle_block, output_blocks) in float16; the time embedding, the linear
        layers, the norms (computed in float32), the attention softmax and the output head stay float32.
        forward then runs the torso on float16 activations and returns float32, as the original does."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.weight.data = module.weight.data.half()
                    if module.bias is not None:
                        module.bias.data = module.bias.data.half()
        self.torso_dtype = torch.float16
        return self

    def forward(self, x: Tensor, steps: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """x [B,C,H,W] in [-1, 1], steps [B] (step indices, may be fractional), y [B] classes -> [B,out,H,W]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("class labels y are required by a class-conditional model and refused by an "
                             f"unconditional one (num_classes={self.num_classes}, y given: {y is not None})")
        emb = self.time_embed(guided_timestep_embedding(steps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        h, skips = (x if self.torso_dtype is None else x.to(self.torso_dtype)), []
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


# -- flags (guided-diffusion's names and string forms) -----------------------------------------------

# The 256x256 unconditional ImageNet model (guided-diffusion's README flags; the rest its defaults).
GUIDED_DEFAULTS: Dict[str, Any] = dict(
    image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True, class_cond=False,
    attention_resolutions="32,16,8", num_heads=4, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=True, use_new_attention_order=False,
    use_checkpoint=False,
    # ssni's options (not guided-diffusion flags): how continuous t becomes the step input, and the precision
    time_input="step_index", precision="fp32",
    # diffusion flags: accepted so that a full guided-diffusion / DiffPure model config can be passed
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False,
)
# guided-diffusion's default channel multipliers by image size (channel_mult="")
DEFAULT_CHANNEL_MULT: Dict[int, Tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_BOOL_FLAGS = ("learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown", "use_fp16",
               "use_new_attention_order", "use_checkpoint", "use_kl", "predict_xstart", "rescale_timesteps",
               "rescale_learned_sigmas")
_INT_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_head_channels",
              "num_heads_upsample", "diffusion_steps")
NUM_CLASSES = 1000  # ImageNet, for class_cond models
# step_index: t N - 1 (guided-diffusion's p_sample loop, DiffPure's DDPM runner); step_floor: floor(t N)
# (DiffPure's SDE runner, `(t * N).long()`). On the grid t = (i + 1) / N they give i and i + 1.
GUIDED_TIME_INPUTS = ("step_index", "step_floor")
PRECISIONS = ("fp32", "fp16")  # fp16: guided-diffusion's convert_to_fp16 (the torso's convolutions in float16)


def _as_bool(name: str, value: Any) -> bool:
    """A flag given as bool, 0/1 or a command-line string (true/false, yes/no, t/f, y/n, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in ("true", "yes", "t", "y", "1"):
        return True
    if word in ("false", "no", "f", "n", "0"):
        return False
    raise ValueError(f"guided_diffusion flag {name}: expected a boolean, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    """A flag given as an int or its string form."""
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"guided_diffusion flag {name}: expected an integer, got {value!r}") from None


def _number_list(name: str, value: Any) -> List[float]:
    """"1,1,2" / "32,16,8" / a number / a sequence of numbers -> a list (ints where integral)."""
    items = str(value).split(",") if isinstance(value, str) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    try:
        nums = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"guided_diffusion flag {name}: expected comma-separated numbers, got {value!r}") from None
    return [int(v) if v == int(v) else v for v in nums]


def _channel_mult(value: Any, image_size: int) -> List[float]:
    """channel_mult: "" (the default for the image size), "1,1,2,2,4,4" or a sequence -> a list."""
    if value is None or value == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"guided_diffusion: no default channel_mult for image_size {image_size} (defaults "
                             f"exist for {sorted(DEFAULT_CHANNEL_MULT)}); give channel_mult, e.g. \"1,2,2\"")
        return list(DEFAULT_CHANNEL_MULT[image_size])
    mult = _number_list("channel_mult", value)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"guided_diffusion flag channel_mult: expected positive multipliers, got {value!r}")
    return mult


def _check_geometry(cfg: Dict[str, Any]) -> None:
    """Image size divisible down the levels; every attention resolution is one of the levels."""
    level_sizes(cfg["image_size"], len(cfg["channel_mult"]), cfg["attention_resolutions"], "guided_diffusion flag",
                "image_size", "attention_resolutions")


def _check_diffusion_flags(cfg: Dict[str, Any]) -> None:
    """Diffusion flags we accept only where they leave the eps network and its time input as ours."""
    if cfg["noise_schedule"] != "linear":
        raise ValueError(f"guided_diffusion flag noise_schedule: only \"linear\" (the VP schedule) is supported, "
                         f"got {cfg['noise_schedule']!r}")
    if cfg["predict_xstart"]:
        raise ValueError("guided_diffusion flag predict_xstart=True: such a model predicts x0, not eps; "
                         "only eps-predicting models are supported")
    if cfg["rescale_timesteps"] and cfg["diffusion_steps"] != 1000:
        raise ValueError("guided_diffusion flag rescale_timesteps=True with diffusion_steps != 1000 feeds the "
                         "network t * 1000 / N, which the step_index time input does not model")
    if cfg["diffusion_steps"] <= 0:
        raise ValueError(f"guided_diffusion flag diffusion_steps must be positive, got {cfg['diffusion_steps']}")


def guided_flags(**flags: Any) -> Dict[str, Any]:
    """guided-diffusion flags (its names, values or their string forms) -> the full, typed flag dict.

    Unknown names raise an error listing the valid ones. channel_mult comes back resolved (a list)
    and attention_resolutions as a list of ints; the result, passed back in, gives the same model.
    """
    unknown = sorted(set(flags) - set(GUIDED_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown guided_diffusion flag(s) {unknown}; valid flags: {', '.join(sorted(GUIDED_DEFAULTS))}")
    cfg = {**GUIDED_DEFAULTS, **flags}
    for name in _BOOL_FLAGS:
        cfg[name] = _as_bool(name, cfg[name])
    for name in _INT_FLAGS:
        cfg[name] = _as_int(name, cfg[name])
    try:
        cfg["dropout"] = float(cfg["dropout"])
    except (TypeError, ValueError):
        raise ValueError(f"guided_diffusion flag dropout: expected a number, got {cfg['dropout']!r}") from None
    cfg["time_input"], cfg["precision"] = str(cfg["time_input"]), str(cfg["precision"])
    if cfg["time_input"] not in GUIDED_TIME_INPUTS:
        raise ValueError(f"guided_diffusion option time_input={cfg['time_input']!r}; choose one of "
                         f"{list(GUIDED_TIME_INPUTS)} (step_index: guided-diffusion's own sampler, t N - 1; "
                         f"step_floor: DiffPure's SDE runner, floor(t N))")
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"guided_diffusion option precision={cfg['precision']!r}; choose one of {list(PRECISIONS)} "
                         f"(fp16: the torso in float16 as guided-diffusion's use_fp16=True runs it)")
    cfg["noise_schedule"] = str(cfg["noise_schedule"])
    cfg["timestep_respacing"] = str(cfg["timestep_respacing"])  # sampling only: the network sees original steps
    cfg["channel_mult"] = _channel_mult(cfg["channel_mult"], cfg["image_size"])
    cfg["attention_resolutions"] = [_as_int("attention_resolutions", r)
                                    for r in _number_list("attention_resolutions", cfg["attention_resolutions"])]
    _check_geometry(cfg)
    _check_diffusion_flags(cfg)
    return cfg


def build_guided_unet(cfg: Dict[str, Any]) -> GuidedUNet:
    """The GuidedUNet that guided-diffusion's flags describe (cfg from `guided_flags`), in fp32."""
    size = cfg["image_size"]
    return GuidedUNet(
        image_size=size, in_channels=3, model_channels=cfg["num_channels"],
        out_channels=6 if cfg["learn_sigma"] else 3, num_res_blocks=cfg["num_res_blocks"],
        attention_ds=[size // r for r in cfg["attention_resolutions"]],  # image resolutions -> downsample rates
        dropout=cfg["dropout"], channel_mult=cfg["channel_mult"],
        num_classes=NUM_CLASSES if cfg["class_cond"] else None, num_heads=cfg["num_heads"],
        num_head_channels=cfg["num_head_channels"], num_heads_upsample=cfg["num_heads_upsample"],
        use_scale_shift_norm=cfg["use_scale_shift_norm"], resblock_updown=cfg["resblock_updown"],
        use_new_attention_order=cfg["use_new_attention_order"])


def _plain_state(obj: Any, path: str | os.PathLike) -> Dict[str, Tensor]:
    """The file's content as {name: tensor}, or a one-line error saying what it holds instead."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    what = (f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__)
    raise ValueError(f"{path}: expected a plain state dict (parameter name -> tensor), as guided-diffusion "
                     f"saves its models; the file holds {what}")


@PRETRAINED_FORMATS.register("guided_diffusion")
def load_guided_diffusion(path: str | os.PathLike, **flags: Any) -> VPBackbone:
    """guided-diffusion's UNetModel checkpoint (e.g. 256x256_diffusion_uncond.pt) as an EpsModel [B,3,H,W].

    flags: guided-diffusion's (see GUIDED_DEFAULTS; defaults = the 256x256 unconditional ImageNet
    model), and two of ssni's: time_input "step_index" (the default: t N - 1, as guided-diffusion's own
    sampler and DiffPure's DDPM runner) or "step_floor" (floor(t N), as DiffPure's SDE runner), and
    precision "fp32" (the default: float32 throughout) or "fp16" (the torso in float16 as guided-diffusion's
    convert_to_fp16 runs it, what use_fp16=True does there; use_fp16 itself switches nothing here).
    A learn_sigma model's variance channels are dropped.
    """
    cfg = guided_flags(**flags)
    if cfg["class_cond"]:
        raise ValueError("guided_diffusion flag class_cond=True: a class-conditional model needs class labels, "
                         "which the score-model contract (x, t) does not carry; build GuidedUNet directly "
                         "(build_guided_unet) and pass y")
    net = build_guided_unet(cfg)
    state = _plain_state(torch_file(path), path)
    load_state_checked(net, state, "guided_diffusion", cfg, path)
    if cfg["precision"] == "fp16":
        net.convert_to_fp16()
    # guided-diffusion's linear schedule, betas (1000 / N) * [1e-4 .. 0.02], is VPDiffusion(0.1, 20, N)
    diffusion = VPDiffusion(0.1, 20.0, cfg["diffusion_steps"])
    return VPBackbone(net, in_channels=3, image_size=cfg["image_size"], time_input=cfg["time_input"],
                      diffusion=diffusion, config=cfg)


__all__ = ["GuidedUNet", "GuidedResBlock", "GuidedAttention", "GroupNormF32", "guided_timestep_embedding",
           "GUIDED_DEFAULTS", "GUIDED_TIME_INPUTS", "PRECISIONS", "guided_flags", "build_guided_unet",
           "load_guided_diffusion"]
