"""Keep freed memory in the process (glibc malloc), so a training step does not page-fault
its buffers in anew every step.

torch's CPU allocator is plain malloc/free. With glibc's defaults a freed block at the top of
the heap is handed back to the kernel once more than ~2x the (dynamic) mmap threshold is free,
and blocks above the threshold are mmap'ed and munmap'ed on every free: the next step's
allocations then fault every page in again, and the kernel zeroes each one. Measured on this
2-core VM (demo-cpu model, E=96, real batches, fp32, 2026-12-01): ~105,000 minor page faults
and ~330 ms of system CPU time per ~900 ms training step. With the trim threshold at 1 GiB and
the mmap threshold at its 32 MiB maximum (and the LM head's CE in chunks, whose temporaries stay
under that threshold: sigma_moe_kernels/linear_ce.py), 1 fault and ~0-8 ms of system time per step, and
the step median 940 -> 740 ms (4 alternating fresh-process rounds each).

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
TRIM_THRESHOLD_BYTES = 2**30
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory() -> bool:
    """Set the two thresholds; True when glibc accepted both."""
    if os.environ.get("SIGMA_MOE_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(ok_trim and ok_mmap)


ACTIVE = keep_freed_memory()
