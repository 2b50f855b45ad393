"""Where a worker sits in the group, and the few collectives the loop needs (plain torch.distributed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerContext:
    """A worker's rank, group size and device. `world_size == 1` runs without torch.distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def all_reduce_sum(value: torch.Tensor, context: WorkerContext) -> torch.Tensor:
    """Sum a tensor over all workers (a copy; the input is untouched)."""
    value = value.detach().clone()
    if context.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor, context: WorkerContext) -> torch.Tensor:
    value = value.detach().clone()
    if context.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_to_main(obj: Any, context: WorkerContext) -> list[Any] | None:
    """Every worker's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not context.is_distributed:
        return [obj]
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: Any, context: WorkerContext) -> Any:
    """Rank 0's `obj` on every worker."""
    if not context.is_distributed:
        return obj
    box = [obj if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: WorkerContext) -> None:
    if context.is_distributed:
        dist.barrier()
