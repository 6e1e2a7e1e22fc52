"""Keep freed memory in the process (glibc malloc), so a training step does not page-fault
its buffers in anew every step.

torch's CPU allocator is plain malloc/free. With glibc's defaults a freed block at the top of
the heap is handed back to the kernel once more than ~2x the (dynamic) mmap threshold is free,
and blocks above the threshold are mmap'ed and munmap'ed on every free: the next step's
allocations then fault every page in again, and the kernel zeroes each one. Measured on this
2-core VM (demo-cpu model, E=96, real batches, fp32, 2026-12-01): ~105,000 minor page faults
and ~330 ms of system CPU time per ~900 ms training step. With the trim threshold at 1 GiB and
the mmap threshold at its 32 MiB maximum (and the LM head's CE in chunks, whose temporaries stay
under that threshold: sigma_moe_kernels/linear_ce.py), 1 fault and ~0-8 ms of system time per
step, and the step median 940 -> 740 ms (4 alternating fresh-process rounds each).

A block over 32 MiB is still mmap'ed whatever the threshold (glibc's cap), and an MoE layer's
expert weight gradients are such blocks: [96, 512, 256] fp32 is 48 MiB, three per layer, new
every step. So mmap is turned off for malloc (``M_MMAP_MAX = 0``: every block comes from the
heap and is reused; glibc still falls back to mmap where the heap cannot grow). The `bench
layer` MoE layer (T=4096, D=512, F=256, E=96, top-1) fwd+bwd, gradients new every step, median
ms (session 8): glibc's defaults 191-213 (57,000 faults, ~140 ms of system time a step); mmap
off 129-139 (0 faults); the dense SwiGLU FFN of the same active size 57-65.

Transparent huge pages are *not* asked for. Sessions 8-11 also set torch's own switch
``THP_MEM_ALLOC_ENABLE=1`` (2 MiB-aligned, ``MADV_HUGEPAGE`` buffers): with malloc's mmap on it
cut the faults (that layer 144-154 ms), but with mmap off a step faults nothing either way, and
what is left of huge pages is their first touch, which on this VM (a Firecracker guest) is slow:
the MoE layer's first fwd+bwd took 1.2 s of system time with them and 0.19 s without, and later
steps faulted fresh huge pages again in bursts (one: 1,115 faults, 0.8 s of system time).
Measured 2026-12-06 (s12), `sigma-moe train configs/demo-cpu.yaml`, 40 steps, 3 alternating
fresh-process pairs, with / without: E=32 ZeRO-1 wall 34.7-36.0 / 30.6-32.8 s, first 3 steps
0.7-1.3 s / 0.4-0.5 s each; E=96 ZeRO-0 wall 45.9-47.3 / 38.6-39.8 s, first step 2.6-3.0 /
0.54-0.63 s, steady median step 449-487 / 431-457 ms. The MoE layer alone (30 steps, 3 pairs):
steady medians equal (82-93 / 78-91 ms), 1-3 steps over 110 ms in each run with huge pages and
none without. A user who measures a gain on their machine sets THP_MEM_ALLOC_ENABLE=1; nothing
here touches it.

The cost: RSS stays near the run's peak instead of shrinking between steps (a trainer's
working set is the same every step anyway). `SIGMA_MOE_MALLOPT=0` leaves malloc as it is; on a
libc other than glibc (macOS, musl) nothing is done. mallopt acts on later allocations, so this
runs when sigma_moe is imported, before any model exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**30
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory() -> bool:
    """Set the thresholds and turn malloc's mmap off; True when glibc accepted all three."""
    if os.environ.get("SIGMA_MOE_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    ok_max = mallopt(_M_MMAP_MAX, 0)
    return bool(ok_trim and ok_mmap and ok_max)


ACTIVE = keep_freed_memory()
