#!/usr/bin/env python
"""Where an EP=P training step waits: every torch.distributed collective of the `bench train`
recipe (demo-cpu, E experts, top-1, ZeRO-0) timed on each rank, per step, medians.

    python -m torch.distributed.run --standalone --nproc-per-node=2 scripts/ep_collectives.py
    ... scripts/ep_collectives.py --balanced   # routing forced to a round robin (timing only)

Prints, per rank: the median step, the median per step of each kind of collective (calls a
step), and of `GradSum` (the ZeRO-0 gradient sum, DeepSpeed's shared-memory all-reduce where it
runs). A collective's time is its round trip plus the wait for the slowest rank. `--balanced`
replaces the router's choice by (token index x 7 + rank) mod E, so the ranks get equal rows: it
shows what routing imbalance costs (its losses are not a real training's). The last line says
which GradSum buckets went through DeepSpeed's shared-memory all-reduce.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sigma_moe.model.moe as moe
import sigma_moe_kernels as K
from sigma_moe.bench import train as bench_train
from sigma_moe.parallel import grad_sum
from sigma_moe.train import loop

KINDS = ("all_to_all_single", "all_reduce", "all_gather", "broadcast", "barrier")


def _timed(owner, name: str, key: str, acc: dict) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[key].append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


class _RoundRobinRouting:
    """sigma_moe_kernels with `topk_route`'s choice replaced by token index x 7 mod E."""

    def __getattr__(self, name):
        return getattr(K, name)

    @staticmethod
    def topk_route(logits_TE, topk, backend=None):
        w, _, _, p = K.topk_route(logits_TE, topk, backend=backend)
        T, E = logits_TE.shape
        e = (torch.arange(T * topk).view(T, topk) * 7 + dist.get_rank()) % E
        return w, e, torch.bincount(e.flatten(), minlength=E), p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    ap.add_argument("--balanced", action="store_true", help="round-robin routing (timing only)")
    ap.add_argument("--quick", action="store_true", help="test-tiny sizes (a smoke test)")
    args = ap.parse_args()
    acc: dict[str, list[float]] = collections.defaultdict(list)
    for name in KINDS:
        _timed(dist, name, name, acc)
    _timed(grad_sum.GradSum, "__call__", "GradSum", acc)
    shm_flags: list[bool] = []
    init = grad_sum.GradSum.__init__

    def recording_init(self, module):
        init(self, module)
        shm_flags.extend(self.shm)

    grad_sum.GradSum.__init__ = recording_init
    if args.balanced:
        moe.K = _RoundRobinRouting()
    per_step: list[tuple[float, dict]] = []
    train_step = loop.Trainer.train_step

    def timed_step(self, step):
        acc.clear()
        t0 = time.perf_counter()
        out = train_step(self, step)
        if step >= args.warmup:
            per_step.append((time.perf_counter() - t0, {k: list(v) for k, v in acc.items()}))
        return out

    loop.Trainer.train_step = timed_step
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = bench_train._recipe(args.experts, args.steps, args.quick, nproc, nproc)
    tmp = Path(tempfile.mkdtemp(prefix="ep-collectives-"))
    try:
        loop.run_training(cfg, tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank = int(os.environ.get("RANK", "0"))
    lines = [f"rank {rank}: median step {statistics.median(s for s, _ in per_step) * 1e3:.1f} ms"]
    for k in sorted({k for _, a in per_step for k in a}):
        total = statistics.median(sum(a.get(k, [])) for _, a in per_step)
        calls = statistics.median(len(a.get(k, [])) for _, a in per_step)
        lines.append(f"  {k:18s} {total * 1e3:6.1f} ms a step  ({calls:.0f} calls)")
    lines.append(f"  GradSum on shared memory: {shm_flags}")
    time.sleep(0.3 * rank)  # rank 0 first
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
