"""score_sde's DDPM++ network (its `ncsnpp` model in the VP configuration), rebuilt here, and the "score_sde" format.

The public VP "DDPM++ deep continuous" CIFAR-10 checkpoint (`checkpoint_8.pth`, used by DiffPure and SSNI)
holds optimizer / model / ema / step: `model` is the state dict with DataParallel's `module.` prefix (957
entries: 956 parameters and a float64 `sigmas` buffer, 106.6M parameters), `ema` holds `decay`,
`num_updates` and `shadow_params`, the EMA weights as a list in `model.parameters()` order. `DDPMpp` has
the same parameter names, shapes and order, so both load with strict=True; the forward pass computes the
same function (checked against the original at relative L2 <= 1e-4 in float32). Its `optimizer` entry
holds numpy scalars (score_sde's training sets the learning rate to `lr * np.minimum(step / warmup, 1.0)`,
pickled by numpy 1.x as numpy.core.multiarray.scalar): the weights-only reader accepts them as data.

Conventions of that model: input in [-1, 1] (centered data); continuous VP time t enters as t x 999
through a sinusoidal embedding cat[sin, cos] with frequencies 10000^(-k / (half - 1)); with
scale_by_sigma=False the output is an unscaled eps prediction. Its VP SDE (beta 0.1 .. 20) is our
VPDiffusion(0.1, 20, 1000).

Options use score_sde's config names (model.* and data.*), e.g.
    load_pretrained("checkpoint_8.pth", "score_sde")                          # deep CIFAR-10, EMA weights
    load_pretrained(path, "score_sde", num_res_blocks=4)                      # the non-deep DDPM++
    load_pretrained(path, "score_sde", weights="model")                       # the raw (non-EMA) weights
    load_pretrained("ema_weights.pt", "score_sde")                            # a plain state dict (weights="state_dict")
Only the VP DDPM++ variant is built (BigGAN residual blocks with nearest / average resampling, positional
embedding, no progressive growing, no FIR kernels); other values of those options raise an error.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion import VPDiffusion
from .layers import level_sizes, resample
from .pretrained import PRETRAINED_FORMATS, VPBackbone, load_state_checked, mismatch_summary, torch_file

# -- building blocks -------------------------------------------------------------------------------


def _variance_scaling_(weight: Tensor, scale: float, fan_in: int, fan_out: int) -> Tensor:
    """Uniform init with variance scale / fan_avg (DDPM's default); a zero scale means 1e-10 (near-zero)."""
    scale = 1e-10 if scale == 0 else scale
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _conv(in_ch: int, out_ch: int, kernel: int, init_scale: float = 1.0) -> nn.Conv2d:
    """kernel x kernel convolution with 'same' padding, DDPM-initialised; [B,in,H,W] -> [B,out,H,W]."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    _variance_scaling_(conv.weight, init_scale, in_ch * kernel * kernel, out_ch * kernel * kernel)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear layer, DDPM-initialised; [B,in] -> [B,out]."""
    layer = nn.Linear(in_dim, out_dim)
    _variance_scaling_(layer.weight, 1.0, in_dim, out_dim)
    nn.init.zeros_(layer.bias)
    return layer


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C / 4, 32) groups and eps 1e-6, as the original; [B,C,H,W] -> same."""
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def ddpmpp_timestep_embedding(labels: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """score_sde's sinusoidal embedding cat[sin, cos], frequencies max_period^(-k / (half - 1)); [B] -> [B, dim]."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=labels.device)
    angles = labels.float()[:, None] * torch.exp(k * (-math.log(max_period) / (half - 1)))[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class NIN(nn.Module):
    """Per-position linear map over channels (a 1x1 conv stored as W [in, out], b [out]); [B,in,H,W] -> [B,out,H,W]."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(_variance_scaling_(torch.empty(in_dim, out_dim), init_scale, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B,in,H,W] -> [B,out,H,W]."""
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[:, None, None]


class AttnBlockpp(nn.Module):
    """Single-head self-attention over positions, residual (scaled by 1/sqrt 2 with skip_rescale); [B,C,H,W] -> same."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)  # output projection
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C,H,W]."""
        b, c, hgt, wid = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (m(h).reshape(b, 1, c, hgt * wid).transpose(-1, -2) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        # softmax(q k^T / sqrt(C)) v over the H*W positions: the attention's default scale is 1/sqrt(C)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hgt, wid)
        out = x + self.NIN_3(out)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block with an additive time embedding, optional up/down resampling.

    forward(x [B,C_in,H,W], temb [B,E] | None) -> [B,C_out,H',W'] (H' = 2H up, H/2 down). Resampling
    acts after the first activation and on the skip branch; Conv_2 (1x1) maps the skip branch when the
    channels or the size change.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 resample: str | None = None, dropout: float = 0.1, skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale)
        if in_ch != out_ch or resample:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.resample = resample
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """x [B,C_in,H,W], temb [B,E] | None -> [B,C_out,H',W']."""
        h = resample(F.silu(self.GroupNorm_0(x)), self.resample)
        x = resample(x, self.resample)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


# -- the network -------------------------------------------------------------------------------------

# The role of each entry of `all_modules` in the forward pass (DDPMpp.roles) (the original keeps one flat list, whose
# indices are part of the parameter names):
#   embed: time-embedding dense layer; conv_in / conv_out: first and last convolution; norm_out: the final
#   GroupNorm + SiLU; push: a residual block whose output is kept as a skip; attn_push: attention
#   replacing the last kept skip; res / attn: no skip bookkeeping; pop: a residual block taking a skip.


class DDPMpp(nn.Module):
    """score_sde's NCSNpp network in the VP DDPM++ configuration; forward(x [B,C,H,W], labels [B]) -> [B,C,H,W].

    labels are the time input (t x 999 for continuous VP models); the output is eps. Parameter names
    (`all_modules.<i>.*`, the `sigmas` buffer) and their order follow the original's state dict.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 8, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.1, conditional: bool = True, skip_rescale: bool = True, init_scale: float = 0.0,
                 num_scales: int = 1000, sigma_min: float = 0.01, sigma_max: float = 50.0):
        super().__init__()
        # unused by the VP forward pass (scale_by_sigma=False), but part of the state dict
        self.register_buffer("sigmas", torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales,
                                                                dtype=torch.float64)))
        self.image_size, self.in_channels, self.nf, self.conditional = image_size, in_channels, nf, conditional
        temb_dim = 4 * nf  # the blocks' Dense_0 exists (unused) in unconditional models too, as in the original
        modules: List[nn.Module] = []
        roles: List[str] = []

        def add(role: str, module: nn.Module) -> None:
            modules.append(module)
            roles.append(role)

        def res(c_in: int, c_out: int | None = None, resample: str | None = None) -> ResnetBlockBigGANpp:
            return ResnetBlockBigGANpp(c_in, c_out, temb_dim, resample, dropout, skip_rescale, init_scale)

        def attn(c: int) -> AttnBlockpp:
            return AttnBlockpp(c, skip_rescale, init_scale)

        if conditional:
            add("embed", _dense(nf, 4 * nf))
            add("embed", _dense(4 * nf, 4 * nf))
        add("conv_in", _conv(in_channels, nf, 3))
        widths = [nf * m for m in ch_mult]
        sizes = [image_size // 2 ** i for i in range(len(widths))]
        skip_widths, ch = [nf], nf
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                add("push", res(ch, width))
                ch = width
                if sizes[level] in attn_resolutions:
                    add("attn_push", attn(ch))
                skip_widths.append(ch)
            if level < len(widths) - 1:
                add("push", res(ch, resample="down"))
                skip_widths.append(ch)
        for role, module in (("res", res(ch)), ("attn", attn(ch)), ("res", res(ch))):
            add(role, module)
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                add("pop", res(ch + skip_widths.pop(), widths[level]))
                ch = widths[level]
            # on the way up, attention follows the level's last residual block only
            if sizes[level] in attn_resolutions:
                add("attn", attn(ch))
            if level:
                add("res", res(ch, resample="up"))
        add("norm_out", _group_norm(ch))
        add("conv_out", _conv(ch, in_channels, 3, init_scale))
        self.all_modules = nn.ModuleList(modules)
        self.roles: Tuple[str, ...] = tuple(roles)

    def time_embedding(self, labels: Tensor) -> Tensor | None:
        """The time embedding fed to every residual block; labels [B] -> [B, 4 nf] (None if unconditional)."""
        if not self.conditional:
            return None
        dense_0, dense_1 = self.all_modules[0], self.all_modules[1]
        emb = ddpmpp_timestep_embedding(labels, self.nf).to(dense_0.weight.dtype)
        return dense_1(F.silu(dense_0(emb)))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """x [B,C,H,W] in [-1, 1], labels [B] (t x 999) -> eps [B,C,H,W]."""
        temb = self.time_embedding(labels)
        h, skips = x, []
        for role, module in zip(self.roles, self.all_modules):
            if role == "embed":
                continue
            if role == "conv_in":
                h = module(h)
                skips.append(h)
            elif role == "push":
                h = module(h, temb)
                skips.append(h)
            elif role == "attn_push":
                h = module(h)
                skips[-1] = h
            elif role == "res":
                h = module(h, temb)
            elif role == "pop":
                h = module(torch.cat([h, skips.pop()], dim=1), temb)
            elif role == "norm_out":
                h = F.silu(module(h))
            else:  # attn, conv_out
                h = module(h)
        return h


# -- options (score_sde's config names) ----------------------------------------------------------------

# The VP "DDPM++ deep continuous" CIFAR-10 model (configs/vp/cifar10_ddpmpp_deep_continuous.py).
SCORE_SDE_DEFAULTS: Dict[str, Any] = dict(
    # data
    image_size=32, in_channels=3, centered=True,
    # architecture
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), dropout=0.1, conditional=True,
    skip_rescale=True, init_scale=0.0, num_scales=1000, sigma_min=0.01, sigma_max=50.0,
    # the VP SDE
    beta_min=0.1, beta_max=20.0, continuous=True,
    # the only values built here (the VP DDPM++ variant)
    name="ncsnpp", resblock_type="biggan", fir=False, progressive="none", progressive_input="none",
    embedding_type="positional", attention_type="ddpm", normalization="GroupNorm", nonlinearity="swish",
    scale_by_sigma=False, conv_size=3,
    # accepted and without effect on this variant (training, FIR, progressive or DDPM-block settings)
    resamp_with_conv=True, fir_kernel=(1, 3, 3, 1), progressive_combine="sum", fourier_scale=16, ema_rate=0.9999,
)
_FIXED = ("name", "resblock_type", "fir", "progressive", "progressive_input", "embedding_type", "attention_type",
          "normalization", "nonlinearity", "scale_by_sigma", "conv_size", "centered")
_INTS = ("image_size", "in_channels", "nf", "num_res_blocks", "num_scales", "conv_size")
_FLOATS = ("dropout", "init_scale", "sigma_min", "sigma_max", "beta_min", "beta_max")
_BOOLS = ("centered", "conditional", "skip_rescale", "continuous", "fir", "scale_by_sigma", "resamp_with_conv")
_ALIASES = {"num_channels": "in_channels"}  # score_sde's data.num_channels


def _int_list(name: str, value: Any) -> Tuple[int, ...]:
    """(1, 2, 2), [16] or "1,2,2" -> a tuple of ints."""
    items = value.split(",") if isinstance(value, str) else (list(value) if isinstance(value, (list, tuple)) else [value])
    try:
        return tuple(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise ValueError(f"score_sde option {name}: expected integers, got {value!r}") from None


def _typed(name: str, value: Any) -> Any:
    """An option converted to its type (bools from bool / 0 / 1 / true / false); a clear error otherwise."""
    try:
        if name in _BOOLS:
            word = str(value).strip().lower()
            if word not in ("true", "false", "1", "0"):
                raise ValueError
            return word in ("true", "1")
        if name in _INTS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if name in _FLOATS:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score_sde option {name}: cannot read {value!r} as "
                         f"{'a boolean' if name in _BOOLS else 'an integer' if name in _INTS else 'a number'}") from None
    return value


def _check_fixed(cfg: Dict[str, Any]) -> None:
    """Options that select another variant than VP DDPM++ are refused, naming the one supported value."""
    for name in _FIXED:
        value, want = cfg[name], SCORE_SDE_DEFAULTS[name]
        if (str(value).lower() != want.lower()) if isinstance(want, str) else (value != want):
            raise ValueError(f"score_sde option {name}={value!r} is not supported: only the VP DDPM++ variant "
                             f"({name}={want!r}) is built here")


def _check_geometry(cfg: Dict[str, Any]) -> None:
    """Image size divisible down the levels; attention resolutions among the levels; sane sizes."""
    size, levels = cfg["image_size"], len(cfg["ch_mult"])
    if not levels or min(cfg["ch_mult"]) <= 0 or cfg["nf"] < 4 or cfg["num_res_blocks"] < 0 or cfg["in_channels"] <= 0:
        raise ValueError(f"score_sde options: need nf >= 4, positive ch_mult, num_res_blocks >= 0 and in_channels > 0, "
                         f"got nf={cfg['nf']}, ch_mult={cfg['ch_mult']}, num_res_blocks={cfg['num_res_blocks']}, "
                         f"in_channels={cfg['in_channels']}")
    level_sizes(size, levels, cfg["attn_resolutions"], "score_sde option", "image_size", "attn_resolutions")
    if not cfg["continuous"] and cfg["num_scales"] != 1000:
        raise ValueError(f"score_sde: a discrete-time model with num_scales={cfg['num_scales']} takes t x "
                         f"{cfg['num_scales'] - 1}; only the t x 999 time input (continuous, or 1000 scales) is supported")


def score_sde_config(**options: Any) -> Dict[str, Any]:
    """score_sde options (config names, values or string forms) -> the full, typed option dict.

    Unknown names raise an error listing the valid ones; the result, passed back in, gives the same model.
    """
    for alias, name in _ALIASES.items():
        if alias in options:
            value = options.pop(alias)
            if name in options and options[name] != value:
                raise ValueError(f"score_sde options {alias}={value!r} and {name}={options[name]!r} disagree")
            options.setdefault(name, value)
    unknown = sorted(set(options) - set(SCORE_SDE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown score_sde option(s) {unknown}; valid options: {', '.join(sorted(SCORE_SDE_DEFAULTS))}")
    cfg = {**SCORE_SDE_DEFAULTS, **options}
    cfg = {k: _typed(k, v) for k, v in cfg.items()}
    for name in ("ch_mult", "attn_resolutions", "fir_kernel"):
        cfg[name] = _int_list(name, cfg[name])
    _check_fixed(cfg)
    _check_geometry(cfg)
    return cfg


def build_ddpmpp(cfg: Dict[str, Any]) -> DDPMpp:
    """The DDPMpp network that score_sde's options describe (cfg from `score_sde_config`)."""
    return DDPMpp(image_size=cfg["image_size"], in_channels=cfg["in_channels"], nf=cfg["nf"], ch_mult=cfg["ch_mult"],
                  num_res_blocks=cfg["num_res_blocks"], attn_resolutions=cfg["attn_resolutions"],
                  dropout=cfg["dropout"], conditional=cfg["conditional"], skip_rescale=cfg["skip_rescale"],
                  init_scale=cfg["init_scale"], num_scales=cfg["num_scales"], sigma_min=cfg["sigma_min"],
                  sigma_max=cfg["sigma_max"])


# -- the checkpoint --------------------------------------------------------------------------------------

# auto: the EMA weights of score_sde's checkpoint (what DiffPure runs), or a plain state dict as it is;
# ema / model: that entry of score_sde's checkpoint; state_dict: the file must be a plain state dict
WEIGHTS = ("auto", "ema", "model", "state_dict")


def _is_state_dict(obj: Any) -> bool:
    """{str: tensor} with at least one entry."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _strip_prefix(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Parameter names without DataParallel's `module.` prefix."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _describe(obj: Any) -> str:
    """What a file holds, in a few words, for an error message."""
    return f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__


def _ema_state(ema: Any, raw: Dict[str, Tensor], net: nn.Module, path: str | os.PathLike) -> Dict[str, Tensor]:
    """The EMA weights under their names: shadow_params in parameters() order, buffers from `model`."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(torch.is_tensor(s) for s in shadow):
        raise ValueError(f"{path}: the checkpoint's 'ema' entry has no list of tensors 'shadow_params' "
                         f"(it holds {_describe(ema)}); pass weights=\"model\" for the raw weights")
    # the EMA keeps the trainable parameters only, in model.parameters() order
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if len(shadow) != len(names):
        raise ValueError(f"{path}: the checkpoint's EMA holds {len(shadow)} parameters, the network built from the "
                         f"options has {len(names)}: the options do not describe this checkpoint's model")
    return {**raw, **dict(zip(names, shadow))}


def score_sde_state(obj: Any, net: nn.Module, weights: str, path: str | os.PathLike,
                    options: Dict[str, Any] | None = None) -> Tuple[Dict[str, Tensor], str]:
    """(the state dict to load, which weights it is: "ema" | "model" | "state_dict") from a score_sde
    checkpoint (optimizer / model / ema / step) or a plain state dict file."""
    if _is_state_dict(obj):
        if weights in ("ema", "model"):
            raise ValueError(f"{path}: weights={weights!r}, but the file is a plain state dict (one set of weights, "
                             f"not score_sde's checkpoint with 'model' and 'ema'); pass weights=\"auto\" or \"state_dict\"")
        return _strip_prefix(obj), "state_dict"
    if not (isinstance(obj, dict) and "model" in obj):
        raise ValueError(f"{path}: expected score_sde's checkpoint (keys optimizer / model / ema / step) or a plain "
                         f"state dict (parameter name -> tensor); the file holds {_describe(obj)}")
    if weights == "state_dict":
        raise ValueError(f"{path}: weights=\"state_dict\", but the file is score_sde's checkpoint (keys {list(obj)[:5]}); "
                         f"pass weights=\"ema\", \"model\" or \"auto\"")
    if not _is_state_dict(obj["model"]):
        raise ValueError(f"{path}: the checkpoint's 'model' entry is not a state dict (it holds {_describe(obj['model'])})")
    raw = _strip_prefix(obj["model"])
    if weights == "model":
        return raw, "model"
    if "ema" not in obj:
        raise ValueError(f"{path}: the checkpoint has no 'ema' entry (keys {list(obj)}); pass weights=\"model\"")
    # score_sde's restore_checkpoint loads `model` (strict=False: other names pass, other shapes stop it)
    # before the EMA; a `model` entry of another shape is refused here too
    wrong = mismatch_summary(net.state_dict(), raw, shapes_only=True)
    if wrong:
        raise ValueError(f"{path}: the checkpoint's 'model' entry does not fit the score_sde model: {wrong}\n"
                         f"(score_sde's restore_checkpoint loads it before the EMA and stops here too; the checkpoint "
                         f"read as format 'score_sde' with options {options})")
    return _ema_state(obj["ema"], raw, net, path), "ema"


@PRETRAINED_FORMATS.register("score_sde")
def load_score_sde(path: str | os.PathLike, weights: str = "auto", **options: Any) -> VPBackbone:
    """score_sde's VP DDPM++ checkpoint (e.g. checkpoint_8.pth) as an EpsModel [B,C,H,W] (time input t x 999).

    weights: "auto" (the default: the checkpoint's EMA weights, what DiffPure runs; a plain state
    dict as it is), "ema", "model" (the raw training weights) or "state_dict" (the file must be a
    plain state dict). config["weights"] records which was loaded. options: score_sde's config names
    (see SCORE_SDE_DEFAULTS; defaults = the deep CIFAR-10 model).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"score_sde: weights={weights!r}; choose one of {list(WEIGHTS)}")
    cfg = score_sde_config(**options)
    net = build_ddpmpp(cfg)
    state, loaded = score_sde_state(torch_file(path), net, weights, path, cfg)
    load_state_checked(net, state, "score_sde", cfg, path)
    diffusion = VPDiffusion(cfg["beta_min"], cfg["beta_max"], 1000)  # the t x 999 time input assumes N = 1000
    return VPBackbone(net, in_channels=cfg["in_channels"], image_size=cfg["image_size"], time_input="t999",
                      diffusion=diffusion, config={**cfg, "weights": loaded})


__all__ = ["DDPMpp", "ResnetBlockBigGANpp", "AttnBlockpp", "NIN", "ddpmpp_timestep_embedding", "SCORE_SDE_DEFAULTS",
           "score_sde_config", "build_ddpmpp", "score_sde_state", "load_score_sde"]
