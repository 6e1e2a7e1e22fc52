"""Keep freed memory in the process (glibc malloc), so a training step does not page-fault
its buffers in anew every step; back torch's big buffers with transparent huge pages.

torch's CPU allocator is plain malloc/free. With glibc's defaults a freed block at the top of
the heap is handed back to the kernel once more than ~2x the (dynamic) mmap threshold is free,
and blocks above the threshold are mmap'ed and munmap'ed on every free: the next step's
allocations then fault every page in again, and the kernel zeroes each one. Measured on this
2-core VM (demo-cpu model, E=96, real batches, fp32, 2026-12-01): ~105,000 minor page faults
and ~330 ms of system CPU time per ~900 ms training step. With the trim threshold at 1 GiB and
the mmap threshold at its 32 MiB maximum (and the LM head's CE in chunks, whose temporaries stay
under that threshold: sigma_moe_kernels/linear_ce.py), 1 fault and ~0-8 ms of system time per step, and
the step median 940 -> 740 ms (4 alternating fresh-process rounds each).

A block over 32 MiB is still mmap'ed whatever the threshold (glibc's cap), and an MoE layer's
expert weight gradients are such blocks: [96, 512, 256] fp32 is 48 MiB, three per layer, new
every step. So mmap is turned off for malloc (``M_MMAP_MAX = 0``: every block comes from the
heap and is reused; glibc still falls back to mmap where the heap cannot grow). And torch is
told to align its buffers of 2 MiB and more to 2 MiB and ``madvise(MADV_HUGEPAGE)`` them
(``THP_MEM_ALLOC_ENABLE=1``, torch's own switch, read once at its first allocation, so it is
set here, before torch loads) where the kernel's transparent huge pages are in ``madvise``
mode; in ``always`` mode the kernel does it unasked, in ``never`` it would not help. Measured
by the first, cut-off try of session 8 (its record is these figures only), the `bench layer`
MoE layer (T=4096, D=512, F=256, E=96, top-1) fwd+bwd, gradients new every step, 3 alternating
fresh-process rounds, median ms: the earlier defaults 191-213 (57,000 faults, ~140 ms of system
time a step); THP alone 144-154 (2,600 faults, 52 ms system); mmap off 129-139 (0 faults); both
123-130 (0 faults); the dense SwiGLU FFN of the same active size 57-65. Re-measured 2026-12-06
(s8), 2-core AMD EPYC VM, `sigma-moe bench layer --topk 1 --repeats 5`: 138 ms, 2.06x the dense
FFN (2026-12-02 without them: 226 ms, 3.12x).

The cost: RSS stays near the run's peak instead of shrinking between steps (a trainer's
working set is the same every step anyway). `SIGMA_MOE_MALLOPT=0` leaves malloc and torch's
allocator as they are; on a libc other than glibc (macOS, musl) nothing is done. mallopt acts
on later allocations, so this runs when sigma_moe is imported, before any model exists. A
user's own ``THP_MEM_ALLOC_ENABLE`` wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**30
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return None
    chosen = [w for w in text.split() if w.startswith("[")]
    return chosen[0].strip("[]") if chosen else None


def huge_pages_for_torch() -> bool:
    """Ask torch for huge-page-backed big buffers where the kernel wants to be asked; True when
    the switch is on for this process (set here or by the user)."""
    if os.environ.get("SIGMA_MOE_MALLOPT", "1") == "0" or "torch" in sys.modules:
        return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    global THP_SET_HERE
    if thp_mode() == "madvise" and "THP_MEM_ALLOC_ENABLE" not in os.environ:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        THP_SET_HERE = True
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


THP_SET_HERE = False  # True when this module set THP_MEM_ALLOC_ENABLE (children inherit it)
ACTIVE = keep_freed_memory()
HUGE_PAGES = huge_pages_for_torch()
