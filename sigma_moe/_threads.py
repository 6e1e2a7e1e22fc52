"""OpenMP settings that must be in the environment before torch loads its OpenMP runtime.

Imported by `sigma_moe/__init__.py`, so `sigma-moe …`, `python -m sigma_moe` and any script
that imports sigma_moe before torch get them; a value the user already set is kept.

OMP_WAIT_POLICY=PASSIVE: libgomp's default lets a thread that finished its share of a parallel
region spin for a while before sleeping. When another CPU-bound process (a second run, the
Rho-1 scorer, anything else) shares the cores, the spinning threads steal the time slices the
lagging thread needs, and every one of the ~1,000 parallel regions of a training step waits for
a descheduled thread. Measured on this 2-core VM at load ~10 (docs/benchmarks/train-2026-12-01.md):
three fp32 GEMMs of the demo MoE layer's size took 220 ms with the default policy and 7-20 ms
with PASSIVE, two threads each.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
