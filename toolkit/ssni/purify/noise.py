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
