"""The rendezvous port: one this process picked itself is picked again when it is taken (CI saw
two RegMix proxy workers fail with EADDRINUSE); a port the launcher gave is never changed."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, socket, sys
import torch.distributed as dist
import sigma_moe.train.engine as E
for k in E.DIST_ENV_KEYS:
    os.environ.pop(k, None)
held = socket.socket()
held.bind(("", 0))
held.listen()
taken = held.getsockname()[1]
if sys.argv[1] == "given":
    os.environ["MASTER_PORT"] = str(taken)
else:
    picks = iter([taken, taken])
    real = E.free_port
    E.free_port = lambda: next(picks, None) or real()
try:
    world = E.init_distributed()
except dist.DistNetworkError as e:
    print("RAISED", "EADDRINUSE" in str(e))
    sys.exit(0)
print("PORTS", taken, os.environ["MASTER_PORT"], world.world_size)
"""


def _child(mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [ln for ln in proc.stdout.splitlines() if ln.startswith(("PORTS", "RAISED"))][-1]


def test_a_picked_port_that_is_taken_is_picked_again():
    _, taken, used, world = _child("picked").split()
    assert world == "1"
    assert used != taken  # two picks hit the held port; the third was free


def test_a_given_port_that_is_taken_is_an_error():
    assert _child("given") == "RAISED True"
