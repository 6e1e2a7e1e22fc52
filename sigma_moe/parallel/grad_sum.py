"""ZeRO-0 gradient reduction over the data-parallel ranks, written here instead of DeepSpeed's.

DeepSpeed's ZeRO-0 path (`engine.buffered_allreduce_fallback`) flattens every gradient,
all-reduces it, divides by the dense data-parallel size and copies it back, and it does so for
the expert gradients too when each expert lives on one rank only (EP = world: the expert-data-
parallel group has size 1), where the all-reduce moves nothing. At E=96, EP=2 on 2 CPU processes
that copy-in / divide / copy-out of ~75 MB of expert gradients was 10.6% of rank 1's step
(py-spy, docs/benchmarks/train-2026-12-02.md, seventh pass).

`GradSum` instead *sums*: the loop scales each rank's loss by 1 / (the global batch), not by
dp / (the global batch) as DeepSpeed's average needs, so a plain sum over the group is the
gradient and nothing is divided. Dense gradients are summed over the data-parallel group (one
flat buffer, as DeepSpeed does); an expert's gradients over its expert-data-parallel group only
where that group has more than one rank. With dp a power of two the result is bitwise DeepSpeed's
(scaling by 2^k commutes with rounding; tests/parallel/test_grad_sum.py checks it at dp = 2
and 4).

Where every rank runs on one machine, the dense bucket (the largest: the tied embedding alone is
8 MB at the CPU demo's size) is summed through DeepSpeed's shared-memory all-reduce instead of
gloo's TCP ring (`shm_sum_usable`), in 2 MB pieces (SHM_PIECE_NUMEL: memory).
"""

from __future__ import annotations

import os

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# DeepSpeed's shared-memory all-reduce stages a message in its 2 x 32 MB workspace, alternating
# halves from call to call, and every rank reads the others' copies: the pages it touches count
# in each process's RSS. One 12 MB message (the CPU demo's dense gradients) added ~50 MB RSS a
# process (the EP=2 demo run then peaked above DeepSpeed AutoEP's); 2 MB pieces add ~10 MB. Time
# of the 12 MB (2 processes, interleaved medians of 25, 2026-12-06): one message 3.2 ms, 4 MB
# pieces 4.4, 2 MB 5.0, 0.5 MB 7.4; gloo 13.5.
SHM_PIECE_NUMEL = 2 * 2**20 // 4


class GradSum:
    """Sums the gradients of `module`'s trainable parameters over the ranks that share them;
    call once per optimizer step, after the last micro-batch's backward. Needs DeepSpeed's
    groups (after `deepspeed.initialize`)."""

    def __init__(self, module: nn.Module):
        dense: list[nn.Parameter] = []
        experts: dict[str, list[nn.Parameter]] = {}
        for p in module.parameters():
            if not p.requires_grad or p.numel() == 0:
                continue
            if is_moe_param(p):
                experts.setdefault(p.group_name, []).append(p)
            else:
                dense.append(p)
        self.params = dense + [p for ps in experts.values() for p in ps]
        self.buckets: list[tuple[list[nn.Parameter], object]] = []
        if dense:
            self.buckets.append((dense, groups._get_data_parallel_group()))
        for name, ps in experts.items():
            group = groups._get_expert_data_parallel_group(name)
            if dist.get_world_size(group) > 1:
                self.buckets.append((ps, group))
        self.shm = _agreed([shm_sum_usable(group) for _, group in self.buckets])

    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:
                # as DeepSpeed: every rank reduces the same sizes, and an expert that saw no
                # token still gets its (zero-gradient) AdamW update
                p.grad = torch.zeros_like(p)
        for (params, group), shm in zip(self.buckets, self.shm):
            grads = [p.grad for p in params]
            flat = _flatten_dense_tensors(grads)
            if shm and flat.dtype == torch.float32:
                for piece in flat.split(SHM_PIECE_NUMEL):  # sums over the world (= the group)
                    ds_comm.inference_all_reduce(piece)
            else:
                dist.all_reduce(flat, group=group)
            for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(summed)


def _agreed(flags: list[bool]) -> list[bool]:
    """Each flag true only where it is true on every rank (one MIN all-reduce at set-up): a rank
    in gloo's all-reduce while another spins on the shared-memory flags would wait forever."""
    if not flags or not dist.is_initialized() or dist.get_world_size() < 2:
        return flags
    if dist.get_backend() != "gloo":  # then every rank's flags are False (shm_sum_usable)
        return flags
    t = torch.tensor(flags, dtype=torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def shm_allreduce_allowed() -> bool:
    """False where the user turned the shared-memory all-reduce off (SIGMA_MOE_SHM_ALLREDUCE=0)."""
    return os.environ.get("SIGMA_MOE_SHM_ALLREDUCE", "1") != "0"


def shm_sum_usable(group) -> bool:
    """Whether DeepSpeed's shared-memory all-reduce (``deepspeed.comm.inference_all_reduce`` on
    its CPU accelerator) may sum fp32 CPU tensors over `group` instead of gloo.

    Measured on this 2-core machine, 2 processes (2026-12-06): 12 MB in one message 2.7 ms
    against gloo's 8.8 (medians of 30), in 2 MB pieces 5.0 against 13.5 (another run,
    interleaved medians of 25); 64 KB 0.07 against 0.63. It sums over the whole world whatever group it
    is given, and it exists only where DeepSpeed mapped its workspace (every rank on one
    machine: ``LOCAL_SIZE`` equal to the world size; without it the op dereferences an unmapped
    workspace and crashes), so: a gloo group that is the whole world, the op built, its fp32
    kernel runnable here. Every rank sums the slots in rank order, so all ranks hold the same
    bits (with two ranks, a + b: gloo's result). ``SIGMA_MOE_SHM_ALLREDUCE=0`` turns it off."""
    if not shm_allreduce_allowed() or not dist.is_initialized():
        return False
    world = dist.get_world_size()
    if world < 2 or dist.get_world_size(group) != world or dist.get_backend(group) != "gloo":
        return False
    if os.environ.get("LOCAL_SIZE") != str(world):
        return False
    backend = ds_comm.comm.cdb
    return (
        getattr(backend, "shm_comm_op", None) is not None
        and getattr(backend, "shm_vector_kernel_level", 0) >= 1
        and hasattr(torch.ops, "deepspeed")
        and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
    )


def can_sum_gradients(engine) -> bool:
    """Whether `GradSum` may replace `engine`'s ZeRO-0 reduction: fp32 gradients reduced in
    fp32 with DeepSpeed's default averaging (no `prescale_gradients`, no
    `gradient_predivide_factor`, no BF16_Optimizer's fp32 accumulation buffers), more than one
    data-parallel rank. Otherwise DeepSpeed's own path stays."""
    return (
        engine.zero_optimization_stage() == 0
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and engine.gradient_average
        and engine.postscale_gradients()
        and engine.gradient_predivide_factor() == 1.0
        and engine.communication_data_type == torch.float32
        and not engine.bfloat16_enabled()
        and not engine.fp16_enabled()
        and not hasattr(engine.optimizer, "get_grads_for_reduction")
    )
