"""The Rho-1 scorer side process: scores the trainer's window ``[pos, pos + G + lookahead)``.

Started (``torch.multiprocessing`` spawn) and restarted by the ``process`` mode of
``ScorerSupervisor`` (``scorer.py``); shares with it the trainer position, a rows-written
counter, a heartbeat, ready / stop events and an error queue. With a ``plan`` (an online
mixer: no global order) it scores the keys the trainer published instead of a window.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass

import torch

from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.rho1.reference import load_reference, reference_dtype

from .scoring import (
    SampleOwner,
    as_run_config,
    build_dataset,
    open_store,
    score_keys,
    score_range,
)


@dataclass
class WorkerArgs:
    cfg_dict: dict
    store: str
    reference: str
    num_samples: int
    lookahead: int
    batch_size: int
    num_threads: int
    global_batch: int
    micro_batch: int
    dp: int
    ranks: list[int] | None
    device: str = "cpu"
    nice: int = 0  # added to the process's niceness at start (rho1.scorer_nice)
    crash_after_rows: int | None = None  # fault injection (tests)
    hang_after_rows: int | None = None  # fault injection (tests)


def read_plan(plan) -> list[tuple[int, int]]:
    """The keys in a shared plan: ``(keys, count)``, keys an int64 array of (domain, index)
    pairs, both written under the array's lock by ``ScorerSupervisor.plan``."""
    keys, count = plan
    with keys.get_lock():
        n = int(count.value)
        flat = keys[: 2 * n]
    return list(zip(flat[0::2], flat[1::2]))


def run_worker(args: WorkerArgs, pos, written, heartbeat, ready, stop, errq, plan=None) -> None:
    """Entry point of the scorer side process (``plan``: see ``read_plan``)."""
    # Ctrl-C reaches the whole process group: the trainer decides when the scorer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    what = "reading the run config"
    try:
        torch.set_num_threads(max(1, args.num_threads))
        if args.nice:
            os.nice(args.nice)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cfg = as_run_config(args.cfg_dict)
        tok = load_tokenizer(cfg.data.tokenizer)
        # The reference first: the likelier failure, and cheaper to import than megatron.
        what = f"loading the reference model {args.reference!r}"
        ref = load_reference(args.reference, tok, device=args.device, dtype=reference_dtype(cfg))
        what = "building the training dataset"
        ds = build_dataset(cfg, args.num_samples, tok)
        what = f"opening the reference-loss store {args.store!r}"
        store = open_store(args.store, ds, "w", ref.fingerprint)
    except BaseException as e:  # report setup failures verbatim; the supervisor does not retry
        errq.put(("setup", f"{what}: {type(e).__name__}: {e}", traceback.format_exc()))
        raise SystemExit(2) from None
    try:
        owner = SampleOwner(args.global_batch, args.micro_batch, args.dp, args.ranks)
        ready.set()
        n_rows = 0

        def on_rows(n: int) -> None:
            nonlocal n_rows
            n_rows += n
            with written.get_lock():
                written.value += n
            if args.crash_after_rows is not None and n_rows >= args.crash_after_rows:
                os._exit(17)  # simulated hard crash (no cleanup)
            if args.hang_after_rows is not None and n_rows >= args.hang_after_rows:
                while True:  # simulated hang: alive, no progress
                    time.sleep(1)

        while not stop.is_set():
            if os.getppid() != parent:
                break  # the trainer died (e.g. SIGKILL): do not linger as an orphan
            with heartbeat.get_lock():
                heartbeat.value += 1
            if plan is not None:  # an online mixer's keys (the first that lack rows)
                if score_keys(ref, ds, store, read_plan(plan), args.batch_size, on_rows) == 0:
                    time.sleep(0.01)  # plan scored: wait for the trainer's next one
                continue
            p = int(pos.value)
            n = score_range(
                ref,
                ds,
                store,
                p,
                p + args.global_batch + args.lookahead,
                args.batch_size,
                owner,
                on_rows,
                should_stop=stop.is_set,
            )
            if n == 0:
                if p >= len(ds):
                    break
                time.sleep(0.01)  # window full: wait for the trainer to advance
        store.close()
    except BaseException as e:
        errq.put(("run", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise SystemExit(1) from None
