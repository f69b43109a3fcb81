"""DDPM++-style U-Net predicting eps from (x, t), with per-sample t."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..diffusion import VPDiffusion
from .base import EpsModel
from .layers import resample


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (already scaled) times; t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, max(1, ch // 4)), num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block with time-embedding injection; optional up/down sampling (BigGAN style)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0,
                 resample: str | None = None, skip_rescale: bool = True):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or resample) else nn.Identity()
        self.resample = resample
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = resample(h, self.resample)
        x = resample(x, self.resample)
        h = self.conv1(h)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out = self.skip(x) + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions, residual."""

    def __init__(self, ch: int, num_heads: int = 1, skip_rescale: bool = True):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.num_heads = num_heads
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three nh c) h w -> three b nh (h w) c",
                            three=3, nh=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(rearrange(out, "b nh (h w) c -> b (nh c) h w", h=h, w=w))
        out = x + out
        return out / math.sqrt(2.0) if self.skip_rescale else out


class UNet(EpsModel):
    """DDPM++-family U-Net: residual blocks with time embedding, GroupNorm, attention at
    chosen resolutions. forward(x [B,C,H,W], t [B]) -> eps [B,C,H,W]."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 num_heads: int = 1, resample_with_resblock: bool = True,
                 beta_min: float = 0.1, beta_max: float = 20.0, num_steps: int = 1000):
        super().__init__(VPDiffusion(beta_min, beta_max, num_steps))
        if image_size % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{len(ch_mult) - 1}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.config = dict(in_channels=in_channels, image_size=image_size, ch=ch,
                           ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout,
                           num_heads=num_heads, resample_with_resblock=resample_with_resblock,
                           beta_min=beta_min, beta_max=beta_max, num_steps=num_steps)
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def resample_block(c: int, mode: str) -> nn.Module:
            if resample_with_resblock:
                return ResBlock(c, c, temb_dim, dropout, resample=mode)
            return nn.Conv2d(c, c, 3, stride=2, padding=1) if mode == "down" else nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))

        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, image_size
        for level, mult in enumerate(ch_mult):
            out = ch * mult
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, out, temb_dim, dropout))
                cur = out
                if res in attn_resolutions:
                    self.down.append(AttnBlock(cur, num_heads))
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(resample_block(cur, "down"))
                res //= 2
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, dropout), AttnBlock(cur, num_heads),
                                  ResBlock(cur, cur, temb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            out = ch * mult
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), out, temb_dim, dropout))
                cur = out
                if res in attn_resolutions:
                    self.up.append(AttnBlock(cur, num_heads))
            if level != 0:
                self.up.append(resample_block(cur, "up"))
                res *= 2
        assert not skips
        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """eps prediction; x: [B,C,H,W] in model space, t: [B] continuous times in [0, 1]."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(self.network_time(t), self.ch))  # t x 999, as score_sde
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            if isinstance(m, AttnBlock):
                h = m(h)
                hs[-1] = h
            elif isinstance(m, ResBlock) and m.resample is None:
                h = m(h, temb)
                hs.append(h)
            else:  # downsampling
                h = m(h, temb) if isinstance(m, ResBlock) else m(h)
                hs.append(h)
        for m in self.mid:
            h = m(h) if isinstance(m, AttnBlock) else m(h, temb)
        for m in self.up:
            if isinstance(m, AttnBlock):
                h = m(h)
            elif isinstance(m, ResBlock) and m.resample is None:
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))
