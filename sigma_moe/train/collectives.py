"""The "do all ranks agree" collectives of checkpointing (one place); each is a no-op without an
initialised process group of more than one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_any(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank."""
    if not _multi_rank():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not _multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
