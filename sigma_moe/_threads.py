"""OpenMP settings that must be in the environment before torch loads its OpenMP runtime.

Imported by `sigma_moe/__init__.py`, so `sigma-moe …`, `python -m sigma_moe` and any script
that imports sigma_moe before torch get them; a value the user already set is kept (if either
OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, neither is touched).

What libgomp (torch's OpenMP) does with a thread that finished its share of a parallel region:
by default it spins ~300,000 times (a few ms) before sleeping; OMP_WAIT_POLICY=PASSIVE sleeps at
once; GOMP_SPINCOUNT=N spins N times, then sleeps. A training step has thousands of parallel
regions with Python in between, so the choice matters both ways, and neither wins everywhere:

* Long spins collapse under contention. When another CPU-bound process (a second run, anything
  else) shares the cores, the spinning threads steal the time slices the lagging thread needs:
  `sigma-moe train` at E=96 with a second training on the same 2 cores, s/step (2026-12-01 s5):
  1,000 spins 1.25, 10,000 spins 2.07, 300,000 spins 2.35 (three fp32 GEMMs: 220 ms vs 7-20).
* Short spins cost on a quiet machine: every region then pays the wake-up of a sleeping (on a
  VM: halted) core. The same training alone, `sigma-moe bench train --experts 96 --variants ours
  hf` alternating (2026-12-02 s6): 1,000 spins 3,231-3,767 tokens/s, libgomp's default
  3,457-4,192 (1.24x the median).

So the choice is made per process, here, from what the cores are doing when it starts:
libgomp's default when this process's threads (x the ranks of this node, LOCAL_WORLD_SIZE) fit
on the cores beside what else is runnable now; PASSIVE + 1,000 spins otherwise. "Runnable now"
is the scheduler's count of running tasks in /proc/loadavg, the smallest of a few samples (a
CPU-bound neighbour is in every sample, a passing one is not). A neighbour that starts later
is not seen: set OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=1000 yourself when you know one will
(README, "Training on a busy laptop"). The Rho-1 scorer side process runs on one thread (no
OpenMP team, so no spinning of its own) at a lower priority (rho1.scorer_nice).
The choice is written to SIGMA_MOE_OMP_WAIT ("spin" or "short") for the run summary; a child
process makes its own (a parent's "short" reaches it as a setting already made, and is kept).
"""

from __future__ import annotations

import os
import time

SHORT = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}  # PASSIVE + N: N spins exactly


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _int_env(env, name: str, default: int) -> int:
    try:
        return max(1, int(env[name]))
    except (KeyError, ValueError):
        return default


def user_set() -> bool:
    """Whether a wait setting is already in the environment (the user's, or a parent's "short")."""
    return any(k in os.environ for k in SHORT)


def runnable_others(samples: int = 4, gap_s: float = 0.005) -> int | None:
    """Tasks running or runnable on the machine besides this one, the least of a few samples of
    /proc/loadavg's fourth field ("running/total"); None where there is no such file."""
    seen = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                seen.append(int(f.read().split()[3].split("/")[0]) - 1)  # minus this reader
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(0, min(seen))


def choose(env: dict[str, str] | os._Environ = os.environ) -> str:
    """'spin' (libgomp's default) when this node's training threads fit beside what is running
    now, else 'short' (PASSIVE + 1,000 spins)."""
    cores_ = cores()
    need = _int_env(env, "OMP_NUM_THREADS", cores_) * _int_env(env, "LOCAL_WORLD_SIZE", 1)
    if need > cores_:
        return "short"  # oversubscribed by this node's own ranks: no need to look further
    others = runnable_others()
    if others is None:
        return "short"  # cannot tell: the setting that never collapses
    return "spin" if need + others <= cores_ else "short"


def apply() -> None:
    if user_set():
        os.environ.pop("SIGMA_MOE_OMP_WAIT", None)  # a parent's record, not this process's choice
        return
    mode = choose()  # every process anew: a child may run beside its siblings (EP ranks)
    os.environ["SIGMA_MOE_OMP_WAIT"] = mode
    if mode == "short":
        os.environ.update(SHORT)


apply()
