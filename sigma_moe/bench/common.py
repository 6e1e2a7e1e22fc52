"""Shared benchmark machinery: side-by-side timing, peak memory, GEMM rate, machine, tables.

Timing: every candidate is run once per round, round after round (interleaved), so a noisy
neighbour on a shared machine slows all candidates alike; we report the median (and min) over
rounds.  Memory: the peak of bytes allocated *during* one fwd+bwd (activations and temporaries)
excluding parameters and the gradients left in ``.grad`` -- measured from the allocator events
of ``torch.profiler(profile_memory=True)`` on CPU, from the CUDA allocator's peak on GPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

import torch


# ----------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001 - optional peers may fail to import for many reasons
        return None


def machine_info() -> dict:
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "deepspeed", "transformers"):
        info[mod] = _version(mod)
    try:
        info["loadavg_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def describe_machine(info: dict) -> str:
    dev = (
        info["cuda"] or f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} threads"
    )
    libs = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "deepspeed", "transformers"))
    return f"{info['date_utc']} UTC | {dev} | {libs}"


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rotated_rounds(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(round, name) for ``repeats`` interleaved rounds of fresh-process runs, each round's order
    rotated by one (a, b, c / b, c, a / ...), so no candidate always runs first after the
    previous one's exit or last before the next's start (a fixed order left every ``none`` run of
    the eleventh pass's Rho-1 comparison first in its round)."""
    names, n = list(names), len(names)
    return [(r, names[(r + i) % n]) for r in range(repeats) for i in range(n)]


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> dict[str, dict]:
    """Interleaved rounds; returns {name: {"median_ms", "min_ms", "times_ms"}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        n: {"median_ms": statistics.median(v), "min_ms": min(v), "times_ms": v}
        for n, v in times.items()
    }


def gemm_flops(device="cpu", dtype=torch.float32, m=4096, k=512, n=512, repeats=25) -> float:
    """Dense GEMM FLOP/s measured now, on this machine (the yardstick for 'fraction achieved'):
    the best of `repeats` calls. 25, not 7: a layer run of session 12 took its 7 calls (~90 ms)
    right after a 2-process benchmark exited and measured 99 GFLOP/s, half the machine's rate
    (its dense FFN then ran at "1.74x the GEMM rate")."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    r = time_side_by_side({"mm": lambda: torch.mm(a, b, out=out)}, repeats, 2, device)["mm"]
    return 2.0 * m * n * k / (r["min_ms"] * 1e-3)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _allocation_events(prof) -> list[tuple[int, int, int]]:
    from torch._C._profiler import _EventType

    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation:
            f = ev.extra_fields
            out.append((ev.start_time_ns, f.ptr, f.alloc_size))
    out.sort(key=lambda e: e[0])
    return out


def peak_memory_bytes(
    fn: Callable[[], object],
    params: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
) -> int:
    """Peak bytes allocated during ``fn()`` minus the gradients it leaves in ``p.grad``.

    Parameters exist before ``fn`` runs, so they are never counted; ``p.grad`` must be None on
    entry (it is reset here) so the gradient buffers are allocated inside ``fn`` and can be
    told apart: an allocation still alive at the end whose address is a ``.grad`` is excluded.
    """
    params = list(params)
    for p in params:
        p.grad = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        # the grads are alive at the end of backward, which is where the peak usually is
        return max(0, torch.cuda.max_memory_allocated() - base - grads)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    events = _allocation_events(prof)
    # which allocation events are never freed (alive at the end)?
    last_alloc: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            last_alloc[ptr] = i
        else:
            last_alloc.pop(ptr, None)
    excluded = {i for ptr, i in last_alloc.items() if ptr in grad_ptrs}
    live = peak = 0
    alive: set[int] = set()  # allocated inside fn and counted
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            if i in excluded:
                continue
            alive.add(ptr)
        elif ptr in alive:
            alive.discard(ptr)
        else:
            continue  # free of a block allocated before fn (or an excluded gradient)
        live += size
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header). Floats get 3 significant-ish digits."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: str | None, obj: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
