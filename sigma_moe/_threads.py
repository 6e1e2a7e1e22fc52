"""OpenMP settings that must be in the environment before torch loads its OpenMP runtime.

Imported by `sigma_moe/__init__.py`, so `sigma-moe …`, `python -m sigma_moe` and any script
that imports sigma_moe before torch get them; a value the user already set is kept (if either
OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, neither is touched).

What libgomp (torch's OpenMP) does with a thread that finished its share of a parallel region:
by default it spins ~300,000 times (a few ms) before sleeping; OMP_WAIT_POLICY=PASSIVE sleeps at
once; GOMP_SPINCOUNT=N spins N times, then sleeps. A training step has thousands of parallel
regions with Python in between, so the choice matters both ways:

* Long spins collapse under contention. When another CPU-bound process (a second run, anything
  else) shares the cores, the spinning threads steal the time slices the lagging thread needs:
  three demo-size fp32 GEMMs took 220 ms with the default policy vs 7-20 ms with PASSIVE, two
  threads each, load ~10 (docs/benchmarks/train-2026-12-01.md).
* Sleeping at once is slow when the machine is quiet: every region then pays a futex wake-up of
  a sleeping (on a VM: halted) core. `sigma-moe train` at E=96 (demo-cpu, top-1, one process,
  2 threads, steps 2-8, 2026-12-01 s4): PASSIVE 1.1-1.3 s a step; 1,000 spins 0.54-0.72 s;
  3,000-100,000 spins 0.7-0.9 s.
* Kept: 1,000 spins (~10 us), then sleep. With a second training run on the same two cores it
  measured 1.3-1.8 s a step vs 1.15-1.8 s with PASSIVE (30,000 spins: 3.5-12 s).
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "1000"  # with PASSIVE set, libgomp spins exactly this long
