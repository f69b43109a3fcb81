"""Process placement in one place: device, rank, world size (torchrun sets the environment)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """Where this process runs and whether it is the one that logs and saves."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun); pick cuda:LOCAL_RANK when available."""
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(device)
        if world > 1:
            raise NotImplementedError(
                "multi-process training is not wired up yet; run with one process")
        return cls(rank=rank, world_size=world, device=dev)
