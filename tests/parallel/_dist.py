"""Spawn N gloo processes for a test (torch.multiprocessing, a free port, one thread each)."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, deepspeed_comm: bool, args: tuple) -> None:
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
    if deepspeed_comm:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=90))
    else:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90)
        )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, deepspeed_comm: bool = False) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh gloo processes; a failure in any
    process fails the call (the others are terminated)."""
    mp.spawn(
        _entry,
        args=(fn, world_size, free_port(), deepspeed_comm, args),
        nprocs=world_size,
        join=True,
    )


def write_result(out_dir: str | Path, rank: int, result: dict) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def read_results(out_dir: str | Path, world_size: int) -> list[dict]:
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
