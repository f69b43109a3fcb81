"""Every seed the toolkit derives, in one place: per-sample seeds, their streams, and step seeds.

Randomness is passed in as seeds (or generators made from them), never read from hidden state, so
a sample gives the same result alone or in a batch and a run repeats bit for bit. The formulas
below are part of what makes results reproducible: changing one changes every number downstream.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

SEED_HIGH = 2 ** 62          # per-sample seeds live in [0, 2^62): valid for manual_seed
_SEED_MASK = SEED_HIGH - 1
BLOCK = 1_000_003            # spacing of the seed blocks of different streams / epochs
_STEP, _RANK = 7_919, 104_729  # primes spreading (seed, step, rank) and (seed, draw) apart


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from labels, e.g. derive_seed(base, "cell", batch); equal labels, equal seed."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def mix_seeds(seeds: Tensor, salt: int) -> Tensor:
    """An independent-looking stream of per-sample seeds; seeds LongTensor [B] -> [B].

    Salt 0 is the score norm's stream, salt 1 + k the k-th purification's.
    """
    # Odd 64-bit multipliers (wrapping int64 arithmetic) spread nearby seeds apart. The salt's term is
    # wrapped to int64 here first: as a Python int it outgrows int64 from salt 3 on (an ensemble of 3).
    c = ((salt * 2 + 1) * 1442695040888963407) % 2 ** 64
    s = seeds.long() * 6364136223846793005 + (c - 2 ** 64 if c >= 2 ** 63 else c)
    s = s ^ (s >> 29)
    return s & _SEED_MASK


def block_seeds(block: int, first: int, n: int) -> Tensor:
    """Per-sample seeds first .. first + n - 1 of seed block `block`; returns LongTensor [n]."""
    return torch.arange(first, first + n) + int(block) * BLOCK


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of a training epoch's data permutation."""
    return int(seed) * BLOCK + int(epoch)


def step_seed(seed: int, step: int, rank: Optional[int] = None) -> int:
    """Seed of a training step (torch's global RNG: dropout); with a rank, that rank's generator."""
    s = int(seed) * _STEP + int(step)
    return s if rank is None else s * _RANK + int(rank)


def draw_seeds_of(seeds: Tensor, draw: Tensor) -> Tensor:
    """Per-(sample, draw) seeds from per-sample seeds [R] and draw indices [R] -> [R]."""
    return seeds * _STEP + draw * _RANK


def draw_seeds(batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fresh per-sample seeds [B] (int64, CPU) from `generator`, or torch's global RNG if None."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, SEED_HIGH, (batch,), generator=generator, device=device).cpu()


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


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(int(seed))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded by `seed`, restoring the caller's RNG state after.

    Model construction uses it, so a recipe's seed fixes the initial weights (and a run killed
    before its first checkpoint restarts as the same network).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
