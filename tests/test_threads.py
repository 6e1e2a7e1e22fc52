"""sigma_moe/_threads.py: the OpenMP wait settings are in the environment before torch loads,
chosen from what the cores are doing, and a user's own setting is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sigma_moe import _threads

PROBE = (
    "import os, sigma_moe, torch; print(os.environ.get('SIGMA_MOE_OMP_WAIT'), "
    "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
)
WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SIGMA_MOE_OMP_WAIT", "LOCAL_WORLD_SIZE")


def _probe(**user: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_KEYS}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, **user}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "user, want",
    [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE None"),
        ({"GOMP_SPINCOUNT": "5"}, "None None 5"),
        # more ranks on this node than cores: never long spins, whatever else runs
        ({"LOCAL_WORLD_SIZE": str(_threads.cores() + 1)}, "short PASSIVE 1000"),
    ],
)
def test_user_values_kept_and_oversubscribed_ranks_get_short_spins(user, want):
    assert _probe(**user) == want


def test_busy_cores_get_short_spins():
    """With a CPU-bound neighbour on every core, a process starting now must not spin long."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(_threads.cores())
    ]
    try:
        time.sleep(0.5)
        assert _threads.runnable_others() >= 1
        assert _probe(OMP_NUM_THREADS="1") == "short PASSIVE 1000"
    finally:
        for p in burners:
            p.kill()
            p.wait()


def test_choice_follows_the_count_of_runnable_tasks(monkeypatch):
    cores = _threads.cores()
    monkeypatch.setattr(_threads, "runnable_others", lambda: 0)
    assert _threads.choose({"OMP_NUM_THREADS": str(cores)}) == "spin"
    assert _threads.choose({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": str(cores + 1)}) == "short"
    monkeypatch.setattr(_threads, "runnable_others", lambda: 1)
    assert _threads.choose({"OMP_NUM_THREADS": str(cores)}) == "short"
    assert _threads.choose({"OMP_NUM_THREADS": "bad"}) == "short"  # bad value: all cores
    monkeypatch.setattr(_threads, "runnable_others", lambda: None)  # no /proc/loadavg
    assert _threads.choose({"OMP_NUM_THREADS": "1"}) == "short"
