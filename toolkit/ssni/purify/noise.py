"""Per-sample noise streams: sample b's k-th Gaussian draw depends only on (seed_b, k).

That is what makes a sample's purification independent of its batch companions and of which
samples happen to be active at a step, and an evaluation repeatable bit for bit. Each sample owns a
`torch.Generator` seeded with its seed; draws are made CHUNK at a time (one call per sample per
CHUNK steps) into a buffer and handed out in order, which keeps the per-step cost negligible.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

# Draws per generator call. Part of the definition of the stream (changing it changes the noise).
CHUNK = 16

_SEED_HIGH = 2 ** 62  # seeds are drawn in [0, 2^62): positive and valid for manual_seed


def draw_seeds(batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sample seeds [B] (int64, CPU) from `generator`, or torch's global RNG if None."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, _SEED_HIGH, (batch,), generator=generator, device=device).cpu()


def check_seeds(seeds: Tensor | Sequence[int], batch: int) -> List[int]:
    """Validate per-sample seeds (LongTensor [B] or a list of B ints) -> list of Python ints."""
    if not torch.is_tensor(seeds):
        seeds = torch.as_tensor(list(seeds))
    if seeds.dim() != 1 or seeds.shape[0] != batch:
        raise ValueError(f"seeds must be an integer tensor of shape [{batch}] (one per sample), "
                         f"got shape {list(seeds.shape)}")
    if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be integers (torch.long), got dtype {seeds.dtype}")
    values = [int(s) for s in seeds.tolist()]
    bad = [b for b, s in enumerate(values) if s < 0]
    if bad:
        raise ValueError(f"seeds must be >= 0; negative for samples {bad}")
    return values


class NoiseStream:
    """Standard normal draws per sample; draw(rows) -> [len(rows), *shape], each row's next draw."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        n = len(self.seeds)
        self._gens: List[Optional[torch.Generator]] = [None] * n
        self._buf = torch.empty((n, CHUNK, *self.shape), device=self.device, dtype=dtype)
        self._count = np.zeros(n, dtype=np.int64)
        self._all = torch.arange(n, device=self.device)

    def _refill(self, b: int) -> None:
        g = self._gens[b]
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seeds[b])
            self._gens[b] = g
        torch.randn((CHUNK, *self.shape), generator=g, device=self.device, dtype=self.dtype,
                    out=self._buf[b])

    def draw(self, rows: Optional[np.ndarray] = None) -> Tensor:
        """Next draw of each sample in `rows` (host int array; None = all) -> [R, *shape]."""
        if rows is None:
            rows = np.arange(len(self.seeds))
        pos = self._count[rows] % CHUNK
        for b in rows[pos == 0].tolist():
            self._refill(b)
        self._count[rows] += 1
        if len(rows) == len(self.seeds) and (pos == pos[0]).all() and (rows == np.arange(len(rows))).all():
            return self._buf[:, int(pos[0])].clone()  # common case: one strided copy, no gather
        r = torch.as_tensor(rows, device=self.device)
        p = torch.as_tensor(pos, device=self.device)
        return self._buf[r, p]

    def draws(self) -> np.ndarray:
        """How many draws each sample has taken so far (host int64 [B])."""
        return self._count.copy()
