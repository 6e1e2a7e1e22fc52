"""DeepSpeed engine setup: process group, DeepSpeed config generated from the run config,
optimizer (torch's fused AdamW where possible), learning-rate schedule."""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from sigma_moe.config import ParallelConfig, TrainConfig
from sigma_moe.parallel.grad_sum import shm_allreduce_allowed
from sigma_moe.parallel.wiring import moe_param_groups


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without its rendezvous, for a child that starts its own: an
    in-process training leaves ``MASTER_PORT`` set (its process group still holds that port), and
    a child that inherits it fails with EADDRINUSE (seen in tests/bench after a training test)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}
    env.update(extra)
    return env


def _init_process_group(backend: str, attempts: int = 5) -> None:
    """``deepspeed.init_distributed``; a port this process picked itself is picked again when
    another process took it between ``free_port()`` and the bind (a port is only free until
    someone binds it). A port given in ``MASTER_PORT`` is the launcher's: its failure is raised
    at once. (CI's EADDRINUSE of 2026-12-01 was an inherited port instead: ``child_env``.)"""
    auto = "MASTER_PORT" not in os.environ
    for attempt in range(attempts):
        if auto:
            os.environ["MASTER_PORT"] = str(free_port())
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            return
        except dist.DistNetworkError as e:
            if not auto or "EADDRINUSE" not in str(e) or attempt == attempts - 1:
                raise


def _unlink_shm_workspace() -> None:
    """Remove the name of DeepSpeed's shared-memory all-reduce workspace of this rank.

    On the CPU accelerator with every rank on one machine (the launcher sets LOCAL_SIZE),
    DeepSpeed maps ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (69 MB a
    rank) and never unlinks it: each 2-process CPU run left 138 MB of RAM in /dev/shm until
    reboot (72 such files, 4.7 GB, on this machine after one day of tests). Once every rank has
    mapped every workspace (they do so inside init; hence the barrier), the names are not needed.
    """
    world = dist.get_world_size()
    if world < 2 or os.environ.get("LOCAL_SIZE") != str(world) or torch.cuda.is_available():
        return
    dist.barrier()
    name = "_".join(
        ["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", "")]
        + [os.environ.get("MASTER_PORT", ""), str(dist.get_rank())]
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


# DeepSpeed's CPU all-reduce workspace a rank (shm.cpp: 2 x 1 MB + 2 x 32 MB + its flags), with
# room to spare
SHM_WORKSPACE_BYTES = 80 * 2**20


def _one_node_local_size() -> None:
    """Set ``LOCAL_SIZE`` (DeepSpeed's launcher's name) from torchrun's ``LOCAL_WORLD_SIZE`` when
    every rank runs on this machine, so DeepSpeed's CPU accelerator maps its shared-memory
    all-reduce (it does only when ``LOCAL_SIZE`` equals the world size). GradSum sums the dense
    gradients through it: 12 MB in 2 MB pieces 5.0 ms against gloo's 13.5 (2 processes, this
    2-core machine, 2026-12-06). Left alone: several nodes, a GPU, a value already set,
    ``SIGMA_MOE_SHM_ALLREDUCE=0``, and a /dev/shm without room for DeepSpeed's workspaces
    (~69 MB a rank, written whole when created: on a smaller tmpfs, e.g. Docker's 64 MB default,
    its init fails or crashes). Every rank reads the same /dev/shm before any workspace exists
    (they are made after the rendezvous), so the ranks decide alike."""
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if torch.cuda.is_available() or world == "1" or local != world:
        return
    if shm_allreduce_allowed() and shm_has_room(int(local)):
        os.environ.setdefault("LOCAL_SIZE", local)


def shm_has_room(ranks: int) -> bool:
    """Whether /dev/shm has room for `ranks` of DeepSpeed's all-reduce workspaces."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= ranks * SHM_WORKSPACE_BYTES


def init_distributed() -> World:
    """Join (or create) the process group. A plain `python` run becomes a 1-process group so the
    same code path (DeepSpeed engine, collectives) runs everywhere."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        _one_node_local_size()
        _init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _unlink_shm_workspace()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def topk_for_step(base: list[int], schedule, step: int) -> list[int]:
    """Progressive sparsification: the first phase whose `until_step` is still ahead applies."""
    topk = list(base)
    for ph in sorted(schedule, key=lambda p: p.until_step, reverse=True):
        if step < ph.until_step:
            for li in ph.layers:
                topk[li] = ph.topk
    return topk


def lr_at(tr: TrainConfig, step: int) -> float:
    """Warmup then cosine / WSD (warmup-stable-decay) / constant, from our own step counter, so
    skipped (NaN) steps and resumes cannot shift the schedule. `tr`: the run's `train` section."""
    if tr.warmup_steps and step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    floor = tr.lr * tr.min_lr_ratio
    if tr.schedule == "constant":
        return tr.lr
    if tr.schedule == "cosine":
        span = max(tr.max_steps - tr.warmup_steps, 1)
        t = min((step - tr.warmup_steps) / span, 1.0)
        return floor + 0.5 * (tr.lr - floor) * (1 + math.cos(math.pi * t))
    decay_start = int(tr.max_steps * (1 - tr.decay_fraction))
    if step < decay_start:
        return tr.lr
    t = min((step - decay_start) / max(tr.max_steps - decay_start, 1), 1.0)
    return tr.lr - (tr.lr - floor) * t


def effective_zero_stage(zero_stage: int, world_size: int) -> int:
    """ZeRO-1/2 with one process partition nothing, but DeepSpeed still copies every gradient
    into its flat buckets, reduces them over the 1-process group, steps a flat fp32 copy of the
    weights and copies it back: ~1/3 of a demo-cpu step at E=96 (sampling profile of ZeRO-1 on
    one process, docs/benchmarks/train-2026-12-01.md). One process runs the same arithmetic as
    ZeRO-0; the resolved config and the checkpoint say so."""
    return 0 if world_size == 1 else zero_stage


def deepspeed_config(tr: TrainConfig, par: ParallelConfig, accum: int) -> dict[str, Any]:
    """The ds_config of a run from its `train` and `parallel` sections; `accum`: the gradient
    accumulation steps for this process count (`RunConfig.check_world` derives them)."""
    stage = par.zero_stage
    ds: dict[str, Any] = {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # ZeRO-0: the loop clips (one foreach norm that it also logs, Trainer._clip_stage0);
        # DeepSpeed's own ZeRO-0 clipping computes a second norm, parameter by parameter.
        "gradient_clipping": tr.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": tr.precision == "bf16"},
        # We pass torch's AdamW (fused on CPU: ~30 ms/step vs ~150 ms unfused for 43M params,
        # measured on this 2-core machine, 2026-11).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # never: the loop logs (metrics.jsonl, progress bar)
        "wall_clock_breakdown": False,
    }
    for k, v in par.deepspeed.items():
        if isinstance(v, dict) and isinstance(ds.get(k), dict):
            ds[k] = {**ds[k], **v}
        else:
            ds[k] = v
    return ds


def build_optimizer(model: torch.nn.Module, tr: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW over the model's parameter groups, from the run's `train` section."""
    groups = moe_param_groups(model, tr.weight_decay)
    # eps: torch's AdamW default (the run config does not expose it)
    kw = dict(lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # a device without a fused kernel
        return torch.optim.AdamW(groups, **kw)


def measure_peak_flops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Dense fp32 GEMM FLOP/s of this device, measured: the MFU denominator on CPU, where no
    datasheet number applies. The best of ``repeats`` n x n GEMMs after one warm-up; ~0.2 s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
