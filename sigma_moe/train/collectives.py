"""The "do all ranks agree" collectives (one place: checkpointing, the loop's non-finite check,
the Rho-1 scorer's failures); each is a no-op without an initialised process group of more than
one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device() -> torch.device:
    """Where a flag is reduced when the caller names no device: a pure NCCL group refuses CPU
    tensors, gloo (and a "cuda:nccl,cpu:gloo" group) takes them."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_flag(flag: bool | torch.Tensor, op, device) -> bool:
    if not _multi_rank():
        return bool(flag)
    if device is None:
        device = flag.device if isinstance(flag, torch.Tensor) else _reduce_device()
    t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1)
    dist.all_reduce(t, op=op)
    return bool(t.item() > 0)


def agree_any(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """True on every rank if `flag` is true on any rank. `flag` may be a one-element tensor
    (reduced on its device, no host sync before the collective); `device` overrides where."""
    return _reduce_flag(flag, dist.ReduceOp.MAX, device)


def agree_all(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """True on every rank only if `flag` is true on every rank (arguments as `agree_any`)."""
    return _reduce_flag(flag, dist.ReduceOp.MIN, device)


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the group in place, on a device the backend takes: a CPU tensor (the
    loop's float64 sums) travels through the GPU under a pure NCCL group, which refuses CPU
    tensors ("No backend type associated with device type cpu")."""
    dev = _reduce_device()
    if t.device == dev:
        dist.all_reduce(t, group=group)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved, group=group)
    return t.copy_(moved)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), on ``t``'s device; moved as ``all_reduce_``."""
    dev = _reduce_device()
    moved = t.to(dev)
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, moved, group=group)
    return [o.to(t.device) for o in out]


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
