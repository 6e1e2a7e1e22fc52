"""Spawn N gloo processes for a test (torch.multiprocessing, a free port, one thread each)."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, init: str, args: tuple, env: dict) -> None:
    # A worker killed by a signal (SIGABRT/SIGSEGV from C++) leaves no Python traceback: print
    # one to stderr, which pytest shows beside the spawn error.
    faulthandler.enable()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if init == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=90))
        if "LOCAL_SIZE" in env:  # DeepSpeed mapped its shared-memory workspace: drop its name
            from sigma_moe.train.engine import _unlink_shm_workspace

            _unlink_shm_workspace()
    elif init in ("torch", "nccl"):
        if init == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if init == "nccl" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=90),
        )
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    # Done: leave without the interpreter's teardown. Process groups that DeepSpeed's `groups`
    # module (and the layers) still reference are otherwise destroyed by C++ static destructors at
    # exit; twice in fresh-clone CI runs (2026-12-01, 2026-12-06) rank 0 of a DeepSpeed-initialised
    # test died with SIGABRT ("terminate called without an active exception") within ~2 s of
    # its start, and neither reproduced in 150+ runs alone or under load. What os._exit skips:
    # atexit handlers, daemon children and unflushed multiprocessing queues (no test uses them
    # after fn returns) and coverage data (not collected here); a worker whose fn raised still
    # exits normally, so its error reaches the parent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn,
    world_size: int,
    *args,
    init: str = "torch",
    env: dict[str, str] | None = None,
    retry_on_signal: bool = False,
) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes; a failure in any
    process fails the call (the others are terminated). `retry_on_signal`: a process killed by
    a signal gets one retry, with a warning -- only for an `fn` that can simply run again (it
    writes its results afresh; a training run appending to its run folder cannot).
    `init`: "torch" (a gloo process group),
    "nccl" (an NCCL process group, process r on GPU r),
    "deepspeed" (deepspeed.init_distributed on gloo) or "none" (only RANK, WORLD_SIZE,
    MASTER_ADDR/PORT... in the environment, as a launcher sets them). `env`: more variables
    for every process (e.g. LOCAL_SIZE, which makes DeepSpeed map its shared-memory all-reduce)."""
    for attempt in (0, 1):
        try:
            mp.spawn(
                _entry,
                args=(fn, world_size, free_port(), init, args, dict(env or {})),
                nprocs=world_size,
                join=True,
            )
            return
        except mp.ProcessExitedException as e:
            # One retry when a process is killed by a signal (SIGABRT/SIGSEGV in C++: see
            # _entry), never on a Python error (ProcessRaisedException); a second crash fails.
            if attempt or e.signal_name is None or not retry_on_signal:
                raise
            warnings.warn(
                f"distributed test: {e}; retrying once (faulthandler's trace above)", stacklevel=2
            )


def write_result(out_dir: str | Path, rank: int, result: dict) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def read_results(out_dir: str | Path, world_size: int) -> list[dict]:
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
