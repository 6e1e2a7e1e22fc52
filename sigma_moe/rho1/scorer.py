"""The Rho-1 scorer: per-token reference losses for the samples the trainer consumes next.

The trainer reads global samples ``0, 1, 2, …`` of its ``TrainDataset`` in order (step ``s``
uses ``[s·G, (s+1)·G)``). The scorer builds the *same* dataset (same domains, seq_len,
num_samples, seed, tokenizer → same sample order) and scores the global indices from the
trainer's position to the end of the current step plus ``rho1.scorer_lookahead`` samples
(``[pos, pos + global_batch_size + lookahead)``), in order, in batches of
``rho1.scorer_batch_size``, writing rows into the ``RefLossStore`` under their
``(domain, sample index)`` key. Rows already in the store are skipped, so a restart, a resumed run
or a re-run only scores what is missing.

Three modes behind one API (``ScorerSupervisor``; ``rho1.scorer``):

- ``process``: a side process (``torch.multiprocessing`` spawn) runs the scorer loop; the trainer
  only reads the store. ``advance(consumed)`` moves its window; ``wait_for(keys)`` blocks until the
  rows exist, checks the process is alive, restarts it (``scorer_max_restarts``) if it died or
  stopped making progress for ``scorer_timeout_s``, and otherwise raises ``ScorerError``. Every
  wait is bounded: it never hangs.
- ``inline``: scores missing keys in the trainer's process on demand (tests, small runs).
- ``prefilled``: only reads a store filled beforehand (``sigma-moe score``); a missing row is an
  error, never a silent fallback to training without selection.

``main(argv)`` is ``sigma-moe score CONFIG --reference PATH --store DIR [--num-samples N]
[--set k=v ...]``: the same scoring code run standalone to prefill a store offline.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ScorerError(RuntimeError):
    """The scorer cannot deliver reference losses (the trainer saves a checkpoint and stops)."""


# --------------------------------------------------------------------------- shared helpers


def _run_config(cfg: Any):
    from sigma_moe.config import RunConfig, config_from_dict

    if isinstance(cfg, RunConfig):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    raise TypeError(f"expected a RunConfig or its dict, got {type(cfg).__name__}")


def default_num_samples(cfg) -> int:
    """The trainer's dataset size (``run_training``: max_steps × global_batch_size)."""
    return int(cfg.train.max_steps) * int(cfg.train.global_batch_size)


def build_dataset(cfg, num_samples: int | None = None, tokenizer=None):
    """The trainer's training dataset, deterministically rebuilt from the run config."""
    from sigma_moe.data.dataset import build_train_dataset
    from sigma_moe.data.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
    n = int(num_samples) if num_samples else default_num_samples(cfg)
    return build_train_dataset(
        cfg.data.domains,
        cfg.data.seq_len,
        n,
        cfg.train.seed,
        tok,
        reset_at_eod=cfg.data.reset_at_eod,
    )


def domain_identities(ds) -> list[str]:
    """Per domain, what fixes the sample at a given index (besides the domain's size)."""
    return [
        f"{Path(p).name}|seed={ds.seed}|seq_len={ds.seq_len}|reset_at_eod={ds.reset_at_eod}"
        for p in ds.prefixes
    ]


def open_store(store_path, ds, mode: str, reference_fingerprint: str | None = None):
    from sigma_moe.rho1.store import RefLossStore

    return RefLossStore(
        store_path,
        domain_names=ds.domain_names,
        domain_sizes=ds.domain_sizes,
        seq_len=ds.seq_len,
        mode=mode,
        tokenizer_fingerprint=ds.tokenizer.fingerprint,
        reference_fingerprint=reference_fingerprint,
        domain_identities=domain_identities(ds),
    )


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _attn_mask(doc_BS: torch.Tensor | None) -> torch.Tensor | None:
    if doc_BS is None:
        return None
    S = doc_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return (doc_BS[:, :, None] == doc_BS[:, None, :]) & causal


def score_samples(ref, samples: Sequence[dict]) -> torch.Tensor:
    """Reference CE [B, S] for dataset samples (labels masked by loss_mask, as the trainer)."""
    from sigma_moe.data.dataset import collate
    from sigma_moe.rho1.reference import score_batch

    b = collate(list(samples))
    labels = b["labels"].masked_fill(b["loss_mask"] <= 0, -100)
    return score_batch(ref, b["input_ids"], labels, _attn_mask(b.get("doc_ids")))


class _Owner:
    """Which global samples this node's trainer ranks consume (micro j of a step → rank j % dp)."""

    def __init__(self, global_batch: int, micro_batch: int, dp: int, ranks: Sequence[int] | None):
        self.G, self.mb, self.dp = int(global_batch), int(micro_batch), int(dp)
        self.ranks = None if ranks is None else set(int(r) for r in ranks)

    def __call__(self, idx: int) -> bool:
        if self.ranks is None:
            return True
        j = (idx % self.G) // self.mb
        return (j % self.dp) in self.ranks


def score_range(
    ref,
    ds,
    store,
    start: int,
    stop: int,
    batch_size: int,
    owner=None,
    on_rows=None,
    should_stop=None,
) -> int:
    """Score the missing global samples in [start, stop); returns the number of rows written."""
    written = 0
    pending: list[tuple[int, int]] = []

    def flush() -> None:
        nonlocal written
        samples = [ds.get_domain_sample(d, i) for d, i in pending]
        ce = score_samples(ref, samples)
        for (d, i), row in zip(pending, ce):
            store.put(d, i, row)
        written += len(pending)
        if on_rows is not None:
            on_rows(len(pending))
        pending.clear()

    seen = set()
    for g in range(start, min(stop, len(ds))):
        if should_stop is not None and should_stop():
            break
        if owner is not None and not owner(g):
            continue
        key = ds.domain_and_index(g)
        if key in seen or store.has(*key):
            continue
        seen.add(key)
        pending.append(key)
        if len(pending) >= batch_size:
            flush()
    if pending and not (should_stop is not None and should_stop()):
        flush()
    return written


# --------------------------------------------------------------------------- side process


@dataclass
class _WorkerArgs:
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
    crash_after_rows: int | None = None  # fault injection (tests)
    hang_after_rows: int | None = None  # fault injection (tests)


def _worker(args: _WorkerArgs, pos, written, heartbeat, ready, stop, errq) -> None:
    """Entry point of the scorer side process."""
    import signal

    # Ctrl-C reaches the whole process group: the trainer decides when the scorer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    what = "reading the run config"
    try:
        torch.set_num_threads(max(1, args.num_threads))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sigma_moe.data.tokenizer import load_tokenizer
        from sigma_moe.rho1.reference import load_reference

        cfg = _run_config(args.cfg_dict)
        tok = load_tokenizer(cfg.data.tokenizer)
        # The reference first: the likelier failure, and cheaper to import than megatron.
        what = f"loading the reference model {args.reference!r}"
        ref = load_reference(args.reference, tok, device=args.device)
        what = "building the training dataset"
        ds = build_dataset(cfg, args.num_samples, tok)
        what = f"opening the reference-loss store {args.store!r}"
        store = open_store(args.store, ds, "w", ref.fingerprint)
    except BaseException as e:  # report setup failures verbatim; the supervisor does not retry
        errq.put(("setup", f"{what}: {type(e).__name__}: {e}", traceback.format_exc()))
        raise SystemExit(2) from None
    try:
        owner = _Owner(args.global_batch, args.micro_batch, args.dp, args.ranks)
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


# --------------------------------------------------------------------------- supervisor


class ScorerSupervisor:
    """Reference losses for the trainer, from a side process, in-process, or a prefilled store.

    Args:
        cfg: the run config (``RunConfig`` or its dict); ``cfg.rho1`` gives the mode, lookahead,
            batch size, restarts and timeout.
        store_path: the reference-loss store folder.
        reference_path: the reference model (default ``cfg.rho1.reference``).
        dataset: the trainer's ``TrainDataset`` (avoids rebuilding it; required to match the
            config otherwise the keys would mean different samples).
        num_samples: the dataset size if ``dataset`` is not given (default max_steps × G).
        dp, ranks: data-parallel size and the trainer ranks this supervisor serves (default:
            all) — the side process scores only the samples those ranks consume.
        num_threads: torch threads of the side process.
        device: where the reference runs (default: cuda:0 — the node's first GPU — when CUDA
            is available, else cpu).
        startup_timeout_s: bound on the side process's start-up (default max(timeout, 120 s)).
        spawn: ``mode="process"`` only: False makes this a follower (the other trainer ranks of
            a node) that reads the store the node's scorer (run by local rank 0) fills and only
            waits, bounded by ``scorer_timeout_s × (scorer_max_restarts + 1)`` without progress.
    """

    def __init__(
        self,
        cfg: Any,
        store_path: str | os.PathLike,
        reference_path: str | os.PathLike | None = None,
        *,
        dataset=None,
        num_samples: int | None = None,
        mode: str | None = None,
        dp: int = 1,
        ranks: Sequence[int] | None = None,
        num_threads: int = 1,
        spawn: bool = True,
        startup_timeout_s: float | None = None,
        device: str | None = None,
        fault_injection: dict | None = None,
    ):
        self.cfg = _run_config(cfg)
        r = self.cfg.rho1
        self.mode = mode or r.scorer
        if self.mode not in ("process", "inline", "prefilled"):
            raise ValueError(f"rho1.scorer must be process, inline or prefilled, got {self.mode!r}")
        self.store_path = Path(store_path)
        self.reference_path = str(reference_path or r.reference or "")
        self.lookahead = int(r.scorer_lookahead)
        self.batch_size = int(r.scorer_batch_size)
        self.max_restarts = int(r.scorer_max_restarts)
        self.timeout_s = float(r.scorer_timeout_s)
        # Start-up (imports, dataset, loading the reference) gets at least 2 minutes.
        self.startup_timeout_s = float(startup_timeout_s or max(self.timeout_s, 120.0))
        self.num_threads = int(num_threads)
        self.dp = int(dp)
        self.ranks = None if ranks is None else list(ranks)
        self._ds = dataset
        self.num_samples = int(dataset.num_samples) if dataset is not None else num_samples
        self.num_samples = self.num_samples or default_num_samples(self.cfg)
        self._fault = dict(fault_injection or {})
        self.spawn = bool(spawn)
        self.device = device or default_device()
        self.restarts = 0
        self.wait_s_total = 0.0
        self.last_wait_s = 0.0
        self.position = 0
        self.store = None
        self._ref = None
        self._proc = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = build_dataset(self.cfg, self.num_samples)
        return self._ds

    def start(self) -> ScorerSupervisor:
        if self._started:
            return self
        if self.mode != "prefilled":
            if not self.reference_path:
                raise ScorerError("rho1.reference is not set: the scorer needs a reference model")
            if not Path(self.reference_path).expanduser().exists():
                raise ScorerError(
                    f"rho1.reference {self.reference_path!r} does not exist: cannot start the "
                    "scorer (train the reference first, e.g. with configs/ref-demo.yaml)"
                )
        ds = self.dataset
        if self.mode != "prefilled":
            from sigma_moe.rho1.reference import check_reference_tokenizer

            try:  # cheap, before spawning anything: a mismatch fails at once
                check_reference_tokenizer(self.reference_path, ds.tokenizer)
            except (FileNotFoundError, ValueError) as e:
                raise ScorerError(f"the Rho-1 scorer cannot start: {e}") from e
        if self.mode == "prefilled":
            ref_fp = None
            if self.reference_path and Path(self.reference_path).expanduser().exists():
                from sigma_moe.rho1.reference import reference_fingerprint

                ref_fp = reference_fingerprint(self.reference_path)
            try:
                self.store = open_store(self.store_path, ds, "r", ref_fp)
            except (FileNotFoundError, ValueError) as e:
                raise ScorerError(f"rho1.scorer=prefilled: {e}") from e
        elif self.mode == "inline":
            from sigma_moe.rho1.reference import load_reference

            try:
                self._ref = load_reference(self.reference_path, ds.tokenizer, device=self.device)
                self.store = open_store(self.store_path, ds, "w", self._ref.fingerprint)
            except (FileNotFoundError, ValueError) as e:
                raise ScorerError(f"scorer cannot start: {e}") from e
        elif self.spawn:
            self._spawn()
            self.store = open_store(self.store_path, ds, "r")
        else:
            self.store = self._open_when_ready(ds)
        self._started = True
        return self

    def _spawn(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        if self._proc is None:  # first start: shared state lives across restarts
            self._pos = ctx.Value("q", self.position)
            self._written = ctx.Value("q", 0)
            self._heartbeat = ctx.Value("q", 0)
            self._stop = ctx.Event()
            self._errq = ctx.Queue()
        self._ready = ctx.Event()
        first = self.restarts == 0
        args = _WorkerArgs(
            cfg_dict=self.cfg.to_dict(),
            store=str(self.store_path),
            reference=self.reference_path,
            num_samples=self.num_samples,
            lookahead=self.lookahead,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            global_batch=self.cfg.train.global_batch_size,
            micro_batch=self.cfg.train.micro_batch_size,
            dp=self.dp,
            ranks=self.ranks,
            device=self.device,
            crash_after_rows=self._fault.get("crash_after_rows") if first else None,
            hang_after_rows=self._fault.get("hang_after_rows") if first else None,
        )
        self._proc = ctx.Process(
            target=_worker,
            args=(
                args,
                self._pos,
                self._written,
                self._heartbeat,
                self._ready,
                self._stop,
                self._errq,
            ),
            name="sigma-moe-scorer",
            daemon=True,
        )
        self._proc.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._ready.is_set():
            err = self._drain_error()
            if err is None and not self._proc.is_alive():
                self._proc.join(1)
                time.sleep(0.2)  # let the queue's pipe deliver a last message
                err = self._drain_error()
                if err is None:
                    raise ScorerError(
                        f"the Rho-1 scorer process exited during start-up (exit code "
                        f"{self._proc.exitcode}) without an error message"
                    )
            if err is not None and err[0] == "setup":
                self._kill()
                # A configuration problem (bad path, tokenizer mismatch, store mismatch):
                # restarting cannot fix it.
                raise ScorerError(f"the Rho-1 scorer could not start: {err[1]}")
            if time.monotonic() > deadline:
                self._kill()
                raise ScorerError(
                    f"the Rho-1 scorer did not become ready within {self.startup_timeout_s:g} s "
                    f"(loading the reference {self.reference_path!r} and the dataset)"
                )
            self._ready.wait(0.05)

    def _follower_patience(self) -> float:
        return self.timeout_s * (self.max_restarts + 1)

    def _open_when_ready(self, ds):
        from sigma_moe.rho1.store import META

        deadline = time.monotonic() + self._follower_patience()
        while not (self.store_path / META).is_file():
            if time.monotonic() > deadline:
                raise ScorerError(
                    f"the Rho-1 store {self.store_path} did not appear within "
                    f"{self._follower_patience():g} s: the node's scorer (local rank 0) did not start"
                )
            time.sleep(0.05)
        return open_store(self.store_path, ds, "r")

    def _wait_follower(self, keys) -> torch.Tensor:
        patience = self._follower_patience()
        last_progress, last_mark = time.monotonic(), self.store.count_done()
        sleep = 0.002
        while True:
            rows = self.store.get_batch(keys)
            if rows is not None:
                return rows
            mark = self.store.count_done()
            now = time.monotonic()
            if mark != last_mark:
                last_mark, last_progress = mark, now
            elif now - last_progress > patience:
                raise ScorerError(
                    f"no new reference losses in store {self.store_path} for {patience:g} s: the "
                    "node's scorer (run by local rank 0) is not delivering"
                )
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.05)

    def _drain_error(self):
        last = None
        while True:
            try:
                last = self._errq.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return last
            self._last_err = last

    def _err_suffix(self, err) -> str:
        err = err or getattr(self, "_last_err", None)
        return f": {err[1]}" if err else ""

    def _kill(self) -> None:
        p = self._proc
        if p is None or not p.is_alive():
            return
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)

    def _restart(self, why: str) -> None:
        err = self._drain_error()
        self._kill()
        if self.restarts >= self.max_restarts:
            raise ScorerError(
                f"the Rho-1 scorer {why} and rho1.scorer_max_restarts={self.max_restarts} "
                f"restarts are used up{self._err_suffix(err)}; store {self.store_path} keeps "
                "every row scored so far"
            )
        self.restarts += 1
        log.warning(
            "Rho-1 scorer %s%s; restarting it (%d/%d) from the store's progress",
            why,
            self._err_suffix(err),
            self.restarts,
            self.max_restarts,
        )
        self._spawn()

    def close(self) -> None:
        if self._proc is not None:
            self._stop.set()
            self._proc.join(10)
            self._kill()
            self._proc = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._started = False

    def __enter__(self) -> ScorerSupervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ trainer API

    def advance(self, consumed_samples: int) -> None:
        """The trainer's position: global samples before it are consumed."""
        self.position = int(consumed_samples)
        if self.mode == "process" and self._proc is not None:
            self._pos.value = self.position

    def alive(self) -> bool:
        return self.mode != "process" or (self._proc is not None and self._proc.is_alive())

    def wait_for(
        self,
        keys: Sequence[tuple[int, int]],
        timeout: float | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """Reference losses [len(keys), S] float32 for ``(domain id, sample index)`` keys.

        ``timeout`` (default ``rho1.scorer_timeout_s``) bounds the time without progress of the
        side process; then it is restarted (bounded), and finally ``ScorerError`` is raised.
        The time spent waiting is added to ``wait_s_total`` / ``last_wait_s``.
        """
        if not self._started:
            self.start()
        if position is not None:
            self.advance(position)
        keys = [(int(d), int(i)) for d, i in keys]
        rows = self.store.get_batch(keys)
        if rows is not None:
            self.last_wait_s = 0.0
            return rows
        if self.mode == "prefilled":
            miss = self.store.missing(keys)
            names = self.store.domain_names
            ex = ", ".join(f"({names[d]}, {i})" for d, i in miss[:3])
            raise ScorerError(
                f"rho1.scorer=prefilled: store {self.store_path} lacks {len(miss)} of "
                f"{len(keys)} rows of this batch (e.g. {ex}); prefill it with `sigma-moe score "
                "CONFIG --reference PATH --store DIR --num-samples N` for this run's config"
            )
        t0 = time.monotonic()
        if self.mode == "inline":
            self._score_inline(keys)
            rows = self.store.get_batch(keys)
        elif not self.spawn:
            rows = self._wait_follower(keys)
        else:
            rows = self._wait_process(keys, self.timeout_s if timeout is None else float(timeout))
        self.last_wait_s = time.monotonic() - t0
        self.wait_s_total += self.last_wait_s
        return rows

    def _score_inline(self, keys) -> None:
        miss = list(dict.fromkeys(self.store.missing(keys)))
        ds = self.dataset
        for s in range(0, len(miss), self.batch_size):
            chunk = miss[s : s + self.batch_size]
            ce = score_samples(self._ref, [ds.get_domain_sample(d, i) for d, i in chunk])
            for (d, i), row in zip(chunk, ce):
                self.store.put(d, i, row)

    def _wait_process(self, keys, timeout: float) -> torch.Tensor:
        last_progress = time.monotonic()
        last_mark = self._written.value
        sleep = 0.002
        while True:
            rows = self.store.get_batch(keys)
            if rows is not None:
                return rows
            if not self._proc.is_alive():
                self._proc.join(1)
                self._restart(f"died (exit code {self._proc.exitcode})")
                last_progress, last_mark = time.monotonic(), -1
                continue
            mark = self._written.value
            now = time.monotonic()
            if mark != last_mark:
                last_mark, last_progress = mark, now
            elif now - last_progress > timeout:
                self._restart(f"made no progress for {timeout:g} s (rho1.scorer_timeout_s)")
                last_progress, last_mark = time.monotonic(), -1
                continue
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.05)

    def status(self) -> dict[str, Any]:
        """For the progress bar / metrics."""
        return {
            "scorer_wait_s": self.last_wait_s,
            "scorer_wait_s_total": self.wait_s_total,
            "scorer_restarts": self.restarts,
        }


# --------------------------------------------------------------------------- CLI


def prefill(
    cfg,
    reference: str,
    store_path: str,
    num_samples: int | None = None,
    start: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score global samples [start, num_samples) of the run's dataset into the store."""
    from sigma_moe.rho1.reference import load_reference

    cfg = _run_config(cfg)
    ds = build_dataset(cfg, num_samples)
    ref = load_reference(reference, ds.tokenizer, device=default_device())
    store = open_store(store_path, ds, "w", ref.fingerprint)
    n = min(int(num_samples or default_num_samples(cfg)), len(ds))
    bs = int(batch_size or cfg.rho1.scorer_batch_size)
    t0 = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n - start, desc="scoring", unit="sample", dynamic_ncols=True)
    written = 0
    chunk = max(bs, 64)
    for s in range(start, n, chunk):
        written += score_range(ref, ds, store, s, min(n, s + chunk), bs)
        if bar is not None:
            bar.update(min(n, s + chunk) - s)
    if bar is not None:
        bar.close()
    store.close()
    dt = time.monotonic() - t0
    return {
        "store": str(store_path),
        "samples": n - start,
        "rows_written": written,
        "seconds": dt,
        "tokens_per_s": written * ds.seq_len / dt if dt > 0 else 0.0,
        "reference": ref.path,
        "reference_params": ref.num_params,
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="sigma-moe score",
        description="Prefill a Rho-1 reference-loss store offline: score the training samples "
        "of CONFIG with the reference model (the code the scorer side process runs).",
    )
    p.add_argument("config", help="run recipe (YAML), the same the trainer uses")
    p.add_argument("--reference", default=None, help="reference model (default: rho1.reference)")
    p.add_argument("--store", default=None, help="store folder (default: rho1.store)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="global samples to score (default: train.max_steps × train.global_batch_size)",
    )
    p.add_argument("--start", type=int, default=0, help="first global sample to score")
    p.add_argument("--batch-size", type=int, default=None, help="default: rho1.scorer_batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from sigma_moe.config import load_config

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    reference = args.reference or cfg.rho1.reference
    store = args.store or cfg.rho1.store
    if not reference:
        print("error: no reference model: pass --reference or set rho1.reference", file=sys.stderr)
        return 2
    if not store:
        print("error: no store folder: pass --store or set rho1.store", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = prefill(
            cfg,
            reference,
            store,
            num_samples=args.num_samples,
            start=args.start,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"scored {res['rows_written']} new rows of {res['samples']} samples into {res['store']} "
        f"in {res['seconds']:.1f} s ({res['tokens_per_s']:.0f} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
