"""sigma_moe._malloc: glibc keeps freed memory, so a repeated big allocation stops faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import sigma_moe, torch
from sigma_moe import _malloc
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a step's temporaries: 4 x 12 MB alive at once, freed together
    ts = [torch.ones(3 * 2**20) for _ in range(4)]
    return sum(float(t.sum()) for t in ts)
for _ in range(3):
    step()
f0 = faults()
for _ in range(10):
    step()
print(_malloc.ACTIVE, faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_memory_is_reused_without_faults(setting):
    env = dict(os.environ, SIGMA_MOE_MALLOPT=setting, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    active, faults = out[-2] == "True", int(out[-1])
    if setting == "1":
        # 10 steps x 48 MB = 122,880 pages if every step faulted its temporaries anew; measured
        # 3,072 (one-off heap growth) with the setting; glibc's defaults gave 39,840 in one run
        # and 0 in another (its dynamic thresholds depend on the heap's history), so only the
        # setting's side is asserted
        assert active and faults < 8000, faults
    else:
        assert not active
