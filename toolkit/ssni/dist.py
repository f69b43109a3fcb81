"""Process placement in one place: device, rank, world size, and torch.distributed's process group.

Launch with torchrun (`torchrun --nproc_per_node N -m ssni.cli ...`): it sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `DistContext.from_env` joins the process group
(nccl on CUDA, gloo on CPU). With one process nothing is initialised and every helper is a no-op.
The group lives as long as the process: several commands in one launch (`ssni demo`, or run_* calls
in a script) share it, because joining a second group after destroying the first hangs under
torchrun (measured with torch 2.x and gloo: the second init_process_group never returns).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as tdist
from torch import Tensor


def shard_starts(n: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """First indices of the batches that `rank` of `world` processes takes: every world-th batch
    (strided, so ranks stay within one batch of each other in work)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return range(rank * batch_size, n, world * batch_size)


def join_shards(parts: List[Tensor], batch_size: int) -> Tensor:
    """Undo `shard_starts`: per-rank results [share, ...] (rank order) -> the one-process order [N, ...]."""
    world = len(parts)
    chunks = [list(p.split(batch_size)) for p in parts]
    out = [chunks[j % world][j // world] for j in range(sum(len(c) for c in chunks))]
    return torch.cat(out) if out else torch.zeros(0)


def owner(job: int, world: int) -> int:
    """The rank that runs job number `job` (round robin over every job of a run, done or not)."""
    return job % world


@dataclass
class DistContext:
    """Where this process runs and whether it is the one that logs and saves."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether several processes take part (a process group is initialised)."""
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun); pick cuda:LOCAL_RANK when available; join the group."""
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(device)
            if dev.type == "cuda" and dev.index is None:  # "cuda" under torchrun: this process's GPU
                dev = torch.device(f"cuda:{local}")
        if world > 1:
            if not tdist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                         rank=rank, world_size=world)
                atexit.register(_leave_group)
        return cls(rank=rank, world_size=world, device=dev)

    def barrier(self) -> None:
        """Wait until every process gets here (no-op with one process)."""
        if self.active:
            if self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max/min) `tensor` over processes in place and return it (any shape)."""
        if self.active:
            ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
            tdist.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every process's `obj` (picklable), in rank order; [obj] with one process."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """End of a command: a last barrier (the files exist when any rank returns); the group stays for the
        next command of this process and is left at exit. Safe to call twice or with one process."""
        if self.active:
            self.barrier()


def _leave_group() -> None:
    """At interpreter exit: destroy the process group this process joined (if still there)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
