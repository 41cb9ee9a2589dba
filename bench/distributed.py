"""This process's place in a torchrun job: rank, world size, the object collectives a sweep needs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["Dist", "init_dist"]


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def slice(self, n: int) -> tuple[int, int]:
        """The contiguous block of sample indices of this rank (rank order = sample order)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def init_dist(device_arg: Optional[str]) -> tuple[Dist, str]:
    """This process's :class:`Dist` and device: plain (world 1; ``device_arg`` or cuda when available, else cpu)
    or, under torchrun, the process group joined (nccl on CUDA, gloo otherwise) and cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg is None and torch.cuda.is_available() or (device_arg or "").startswith("cuda")
    if world <= 1:
        device = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = device_arg or "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, local_rank), device
