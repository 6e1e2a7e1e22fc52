"""The Rho-1 scorer supervisor: reference losses for the samples the trainer consumes next.

The trainer reads global samples ``0, 1, 2, …`` of its ``TrainDataset`` in order; the scorer
scores, with the *same* dataset, the global indices from the trainer's position to the end of
the current step plus ``rho1.scorer_lookahead`` samples (``[pos, pos + global_batch_size +
lookahead)``) into the ``RefLossStore`` (the scoring itself: ``scoring.py``).

Four modes behind one API (``ScorerSupervisor``; ``rho1.scorer``), one small strategy class each:

- ``process`` (``_ProcessMode``): a side process (``scorer_worker.py``) runs the scorer loop;
  the trainer only reads the store. ``advance(consumed)`` moves its window; ``wait_for(keys)``
  blocks until the rows exist, checks the process is alive, restarts it
  (``scorer_max_restarts``) if it died or stopped making progress for ``scorer_timeout_s``, and
  otherwise raises ``ScorerError``. Every wait is bounded: it never hangs. With an online
  ``data.mixing.kind`` (``planned``: its samples have no global order) the trainer publishes
  the keys it will read next (``plan(keys)``) and the side process scores those instead of a
  window; a wait for keys the plan missed puts them first.
- ``process`` with ``spawn=False`` (``_FollowerMode``): the other trainer ranks of a node read
  the store that the node's scorer (run by local rank 0) fills, and only wait.
- ``inline`` (``_InlineMode``): scores missing keys in the trainer's process on demand (tests,
  small runs).
- ``prefilled`` (``_PrefilledMode``): only reads a store filled beforehand (``sigma-moe score``,
  ``score_cli.py``); a missing row is an error, never a silent fallback to training without
  selection.

``auto`` (the default) resolves to one of them where the scorer starts (``resolve_mode``).
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from sigma_moe import _threads
from sigma_moe.rho1.reference import (
    check_reference_tokenizer,
    load_reference,
    reference_dtype,
)
from sigma_moe.rho1.store import META

from .scorer_worker import WorkerArgs, run_worker
from .scoring import (
    ScorerError,
    as_run_config,
    build_dataset,
    default_device,
    default_num_samples,
    open_store,
    open_store_checked,
    score_samples,
)

__all__ = ["ScorerError", "ScorerSupervisor", "build_dataset", "score_samples"]

log = logging.getLogger(__name__)


def _poll(get_rows, progress_mark, patience: float, on_stall, restarted_dead=None):
    """Poll ``get_rows()`` with a growing sleep until it returns rows.

    ``progress_mark()`` changing counts as progress; ``patience`` seconds without progress call
    ``on_stall()`` (which raises, or restarts the producer and returns to keep waiting).
    ``restarted_dead()`` (optional) restarts a dead producer and returns True if it did.
    """
    last_progress, last_mark = time.monotonic(), progress_mark()
    sleep = 0.002
    while True:
        rows = get_rows()
        if rows is not None:
            return rows
        if restarted_dead is not None and restarted_dead():
            last_progress, last_mark = time.monotonic(), -1
            continue
        mark = progress_mark()
        now = time.monotonic()
        if mark != last_mark:
            last_mark, last_progress = mark, now
        elif now - last_progress > patience:
            on_stall()
            last_progress, last_mark = time.monotonic(), -1
            continue
        time.sleep(sleep)
        sleep = min(sleep * 1.5, 0.05)


class _Mode:
    """How a supervisor gets rows the store lacks. Every hook but ``open`` and ``fetch`` is a
    no-op by default."""

    needs_reference = True  # start() checks rho1.reference exists and matches the tokenizer

    def __init__(self, sup: ScorerSupervisor):
        self.sup = sup

    def open(self, ds):
        """Start whatever produces rows; returns the opened store."""
        raise NotImplementedError

    def fetch(self, keys, timeout: float):
        """Rows [len(keys), S] for keys some of which the store lacks (or ``ScorerError``)."""
        raise NotImplementedError

    def advance(self, position: int) -> None:
        pass

    def publish(self, keys) -> None:
        pass

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _PrefilledMode(_Mode):
    needs_reference = False

    def open(self, ds):
        try:
            return open_store_checked(
                self.sup.store_path, ds, self.sup.cfg, self.sup.reference_path
            )
        except (FileNotFoundError, ValueError) as e:
            raise ScorerError(f"rho1.scorer=prefilled: {e}") from e

    def fetch(self, keys, timeout: float):
        sup = self.sup
        miss = sup.store.missing(keys)
        names = sup.store.domain_names
        ex = ", ".join(f"({names[d]}, {i})" for d, i in miss[:3])
        raise ScorerError(
            f"rho1.scorer=prefilled: store {sup.store_path} lacks {len(miss)} of "
            f"{len(keys)} rows of this batch (e.g. {ex}); prefill it with `sigma-moe score "
            "CONFIG --reference PATH --store DIR --num-samples N` for this run's config"
        )


class _InlineMode(_Mode):
    def open(self, ds):
        sup = self.sup
        try:
            self.ref = load_reference(
                sup.reference_path,
                ds.tokenizer,
                device=sup.device,
                dtype=reference_dtype(sup.cfg),
            )
            return open_store(sup.store_path, ds, "w", self.ref.fingerprint)
        except (FileNotFoundError, ValueError) as e:
            raise ScorerError(f"scorer cannot start: {e}") from e

    def fetch(self, keys, timeout: float):
        sup = self.sup
        miss = list(dict.fromkeys(sup.store.missing(keys)))
        ds = sup.dataset
        for s in range(0, len(miss), sup.batch_size):
            chunk = miss[s : s + sup.batch_size]
            ce = score_samples(self.ref, [ds.get_domain_sample(d, i) for d, i in chunk])
            for (d, i), row in zip(chunk, ce):
                sup.store.put(d, i, row)
        return sup.store.get_batch(keys)


class _FollowerMode(_Mode):
    def alive(self) -> bool:
        return False  # runs no scorer process of its own

    def patience(self) -> float:
        return self.sup.timeout_s * (self.sup.max_restarts + 1)

    def open(self, ds):
        sup = self.sup
        deadline = time.monotonic() + self.patience()
        while not (sup.store_path / META).is_file():
            if time.monotonic() > deadline:
                raise ScorerError(
                    f"the Rho-1 store {sup.store_path} did not appear within "
                    f"{self.patience():g} s: the node's scorer (local rank 0) did not start"
                )
            time.sleep(0.05)
        try:
            return open_store_checked(sup.store_path, ds, sup.cfg, sup.reference_path)
        except ValueError as e:
            raise ScorerError(f"the node's Rho-1 store: {e}") from e

    def fetch(self, keys, timeout: float):
        store, patience = self.sup.store, self.patience()

        def stalled():
            raise ScorerError(
                f"no new reference losses in store {self.sup.store_path} for {patience:g} s: "
                "the node's scorer (run by local rank 0) is not delivering"
            )

        return _poll(lambda: store.get_batch(keys), store.count_done, patience, stalled)


class _ProcessMode(_Mode):
    """The side process, its shared state (kept across restarts) and its restarts."""

    def __init__(self, sup: ScorerSupervisor):
        super().__init__(sup)
        self.proc = None
        self._last_err = None
        self._plan = None  # planned supervisors: the shared (keys, count), made on first start

    def open(self, ds):
        self._spawn()
        return open_store(self.sup.store_path, ds, "r")

    def _worker_args(self) -> WorkerArgs:
        sup = self.sup
        first = sup.restarts == 0
        fault = sup._fault
        return WorkerArgs(
            cfg_dict=sup.cfg.to_dict(),
            store=str(sup.store_path),
            reference=sup.reference_path,
            num_samples=sup.num_samples,
            lookahead=sup.lookahead,
            batch_size=sup.batch_size,
            num_threads=sup.num_threads,
            global_batch=sup.cfg.train.global_batch_size,
            micro_batch=sup.cfg.train.micro_batch_size,
            dp=sup.dp,
            ranks=sup.ranks,
            device=sup.device,
            nice=sup.nice,
            crash_after_rows=fault.get("crash_after_rows") if first else None,
            hang_after_rows=fault.get("hang_after_rows") if first else None,
        )

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        if self.proc is None:  # first start: shared state lives across restarts
            self._pos = ctx.Value("q", self.sup.position)
            self._written = ctx.Value("q", 0)
            self._heartbeat = ctx.Value("q", 0)
            self._stop = ctx.Event()
            self._errq = ctx.Queue()
            if self.sup.planned:  # (domain, index) pairs and their count
                self._plan = (ctx.Array("q", 2 * self.sup.plan_capacity), ctx.Value("q", 0))
                self.publish(self.sup.planned_keys)
        self._ready = ctx.Event()
        shared = (self._pos, self._written, self._heartbeat, self._ready, self._stop, self._errq)
        self.proc = ctx.Process(
            target=run_worker,
            args=(self._worker_args(), *shared, self._plan),
            name="sigma-moe-scorer",
            daemon=True,
        )
        self.proc.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        sup = self.sup
        deadline = time.monotonic() + sup.startup_timeout_s
        while not self._ready.is_set():
            err = self._drain_error()
            if err is None and not self.proc.is_alive():
                self.proc.join(1)
                time.sleep(0.2)  # let the queue's pipe deliver a last message
                err = self._drain_error()
                if err is None:
                    raise ScorerError(
                        f"the Rho-1 scorer process exited during start-up (exit code "
                        f"{self.proc.exitcode}) without an error message"
                    )
            if err is not None and err[0] == "setup":
                self._kill()
                # A configuration problem (bad path, tokenizer mismatch, store mismatch):
                # restarting cannot fix it.
                raise ScorerError(f"the Rho-1 scorer could not start: {err[1]}")
            if time.monotonic() > deadline:
                self._kill()
                raise ScorerError(
                    f"the Rho-1 scorer did not become ready within {sup.startup_timeout_s:g} s "
                    f"(loading the reference {sup.reference_path!r} and the dataset)"
                )
            self._ready.wait(0.05)

    def _drain_error(self):
        last = None
        while True:
            try:
                last = self._errq.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return last
            self._last_err = last

    def _err_suffix(self, err) -> str:
        err = err or self._last_err
        return f": {err[1]}" if err else ""

    def _kill(self) -> None:
        p = self.proc
        if p is None or not p.is_alive():
            return
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)

    def _restart(self, why: str) -> None:
        sup = self.sup
        err = self._drain_error()
        self._kill()
        if sup.restarts >= sup.max_restarts:
            raise ScorerError(
                f"the Rho-1 scorer {why} and rho1.scorer_max_restarts={sup.max_restarts} "
                f"restarts are used up{self._err_suffix(err)}; store {sup.store_path} keeps "
                "every row scored so far"
            )
        sup.restarts += 1
        log.warning(
            "Rho-1 scorer %s%s; restarting it (%d/%d) from the store's progress",
            why,
            self._err_suffix(err),
            sup.restarts,
            sup.max_restarts,
        )
        self._spawn()

    def publish(self, keys) -> None:
        if self._plan is None:
            return
        arr, count = self._plan
        flat = [x for k in keys[: self.sup.plan_capacity] for x in k]
        with arr.get_lock():
            arr[: len(flat)] = flat
            count.value = len(flat) // 2

    def fetch(self, keys, timeout: float):
        store = self.sup.store
        if self.sup.planned:  # the keys waited for go first, then the rest of the plan
            self.publish(list(dict.fromkeys(store.missing(keys))) + self.sup.planned_keys)

        def restarted_dead() -> bool:
            if self.proc.is_alive():
                return False
            self.proc.join(1)
            self._restart(f"died (exit code {self.proc.exitcode})")
            return True

        def stalled():
            self._restart(f"made no progress for {timeout:g} s (rho1.scorer_timeout_s)")

        return _poll(
            lambda: store.get_batch(keys),
            lambda: self._written.value,
            timeout,
            stalled,
            restarted_dead,
        )

    def advance(self, position: int) -> None:
        if self.proc is not None:
            self._pos.value = position

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def close(self) -> None:
        if self.proc is not None:
            self._stop.set()
            self.proc.join(10)
            self._kill()
            self.proc = None


_MODES = {"prefilled": _PrefilledMode, "inline": _InlineMode, "process": _ProcessMode}


def resolve_mode(mode: str, env=os.environ) -> str:
    """``rho1.scorer`` as it runs here: ``auto`` is ``inline`` where one trainer process holds
    every core of a CPU-only node (its threads: ``OMP_NUM_THREADS``, else torch's), else
    ``process``; any other mode is itself.

    Why: on 2 cores the side process can only run by preempting one of the trainer's OpenMP
    threads, and the other then waits at its next barrier: 0.77-0.80x the tokens/s of
    ``rho1.mode=none``, against 0.85-0.90x scoring inline in the trainer's own threads
    (2026-12-06, docs/rho1.md). With a GPU or a spare core the side process overlaps scoring
    with training; with several ranks on the node one side process serves them all (inline,
    each rank would score into the one store).
    """
    if mode != "auto":
        return mode
    if torch.cuda.is_available() or env.get("LOCAL_WORLD_SIZE", "1") != "1":
        return "process"
    try:
        threads = max(1, int(env.get("OMP_NUM_THREADS", "")))
    except ValueError:
        threads = torch.get_num_threads()
    return "inline" if threads >= _threads.cores() else "process"


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
        self.cfg = as_run_config(cfg)
        r = self.cfg.rho1
        self.mode = resolve_mode(mode or r.scorer)
        if self.mode not in _MODES:
            raise ValueError(
                f"rho1.scorer must be auto, process, inline or prefilled, got {self.mode!r}"
            )
        self.store_path = Path(store_path)
        self.reference_path = str(reference_path or r.reference or "")
        self.lookahead = int(r.scorer_lookahead)
        self.batch_size = int(r.scorer_batch_size)
        self.max_restarts = int(r.scorer_max_restarts)
        self.timeout_s = float(r.scorer_timeout_s)
        self.nice = int(r.scorer_nice)
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
        # An online data.mixing.kind has no global sample order: the trainer's run assembly
        # gives the keys it reads next (``plan``); the side process scores those.
        self.planned = self.cfg.data.mixing.kind != "static"
        # a plan: the next step's keys and the lookahead, plus the keys of a wait put first
        self.plan_capacity = 2 * int(self.cfg.train.global_batch_size) + self.lookahead
        self.planned_keys: list[tuple[int, int]] = []
        self.store = None
        follower = self.mode == "process" and not self.spawn
        self._strategy: _Mode = (_FollowerMode if follower else _MODES[self.mode])(self)
        self._started = False

    @property
    def _proc(self):
        """The side process (``process`` mode while it runs), else None."""
        return getattr(self._strategy, "proc", None)

    # ------------------------------------------------------------------ lifecycle

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = build_dataset(self.cfg, self.num_samples)
        return self._ds

    def _check_reference(self) -> None:
        if not self.reference_path:
            raise ScorerError("rho1.reference is not set: the scorer needs a reference model")
        if not Path(self.reference_path).expanduser().exists():
            raise ScorerError(
                f"rho1.reference {self.reference_path!r} does not exist: cannot start the "
                "scorer (train the reference first, e.g. with configs/ref-demo.yaml)"
            )

    def start(self) -> ScorerSupervisor:
        if self._started:
            return self
        if self._strategy.needs_reference:
            self._check_reference()
        ds = self.dataset
        if self._strategy.needs_reference:
            try:  # cheap, before spawning anything: a mismatch fails at once
                check_reference_tokenizer(self.reference_path, ds.tokenizer)
            except (FileNotFoundError, ValueError) as e:
                raise ScorerError(f"the Rho-1 scorer cannot start: {e}") from e
        self.store = self._strategy.open(ds)
        self._started = True
        return self

    def close(self) -> None:
        self._strategy.close()
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
        self._strategy.advance(self.position)

    def plan(self, keys: Sequence[tuple[int, int]]) -> None:
        """The keys the trainer reads next, in order (``planned`` supervisors; the side process
        scores the first ``plan_capacity`` that lack rows; other modes ignore it)."""
        self.planned_keys = [(int(d), int(i)) for d, i in keys][: self.plan_capacity]
        self._strategy.publish(self.planned_keys)

    def alive(self) -> bool:
        return self._strategy.alive()

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
        t0 = time.monotonic()
        rows = self._strategy.fetch(keys, self.timeout_s if timeout is None else float(timeout))
        self.last_wait_s = time.monotonic() - t0
        self.wait_s_total += self.last_wait_s
        return rows

    def status(self) -> dict[str, Any]:
        """For the progress bar / metrics."""
        return {
            "scorer_wait_s": self.last_wait_s,
            "scorer_wait_s_total": self.wait_s_total,
            "scorer_restarts": self.restarts,
        }
