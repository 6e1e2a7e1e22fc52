"""Grouped fp32 GEMMs on x86-64 CPUs with AVX-512: ``csrc/grouped_gemm.c``, compiled here with
the system C compiler on first use and loaded with ctypes (the pattern of ``_mkl_batch``).

Same interface as ``_mkl_batch.Groups`` (``rows_mm``, ``weights_mm``), so the torch backend's
experts run on either. Written by hand because no library offers a grouped GEMM that does not
pack every expert's weights: MKL's batch GEMM (the path before this one) packs a 512 KB panel
for ~43 rows and ran the layer benchmark's expert GEMMs at ~1.6x a dense GEMM's time; measured
side by side in one process (2-core EPYC VM, 2 threads, T=4096 D=512 F=256 E=96, ms): x @ W[e]
7.2 vs MKL 8.8 (dense 5.8), dy @ W[e]^T 7.8 vs 9.3 (5.7), weight gradient x_e^T @ dh_e 5.1 vs
11.1 (6.1). Details in the C file's header and docs/benchmarks/train-2026-12-06.md.

Built into ``$SIGMA_MOE_CACHE_DIR`` (default ``~/.cache/sigma-moe``) under a name that hashes
the source, the flags and the compiler, written atomically so concurrent test workers agree.
``available()`` is False (and the caller keeps MKL's batch) where the CPU lacks AVX-512, no C
compiler is found (``$CC``, else ``cc``), the build fails, or ``SIGMA_MOE_CGEMM=0``;
``why_unavailable()`` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._mkl_batch import _fp32_cpu

_SRC = Path(__file__).with_name("csrc") / "grouped_gemm.c"
_FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_CPU_FLAGS = ("avx512f", "fma")
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _cpu_ok() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    try:
        flags = next(
            (ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")),
            [],
        )
    except OSError as exc:
        return f"cannot read /proc/cpuinfo: {exc}"
    missing = [f for f in _CPU_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def cache_dir() -> Path:
    return Path(os.environ.get("SIGMA_MOE_CACHE_DIR") or Path.home() / ".cache" / "sigma-moe")


def _compiler() -> tuple[str | None, str]:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, ""
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, ""
    return cc, ver.splitlines()[0] if ver else ""


def _build(cc: str, version: str) -> Path:
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"grouped_gemm-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        res = subprocess.run(
            [cc, *_FLAGS, str(_SRC), "-o", str(tmp_so)], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {_SRC}:\n{res.stderr[-2000:]}")
        os.replace(tmp_so, out)  # atomic: a concurrent build writes the same bytes
    return out


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SIGMA_MOE_CGEMM", "1") == "0":
        return None, "SIGMA_MOE_CGEMM=0"
    why = _cpu_ok()
    if why:
        return None, why
    cc, version = _compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    try:
        # torch has loaded its libgomp.so.1; the library links that soname, so its OpenMP
        # regions use torch's thread pool (no second team of spinning threads)
        lib = ctypes.CDLL(str(_build(cc, version)))
    except (OSError, RuntimeError) as exc:
        return None, f"build or load failed: {exc}"
    lib.smk_rows.argtypes = [_INT] + [_P] * 6 + [_I64] * 5 + [_INT] * 3
    lib.smk_weights.argtypes = [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT]
    lib.smk_rows.restype = lib.smk_weights.restype = _INT
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


def why_unavailable() -> str:
    return _load()[1]


def _ptrs(base: int, index: np.ndarray, stride_elems: int) -> np.ndarray:
    return np.ascontiguousarray(base + index.astype(np.int64) * (stride_elems * 4), dtype=np.int64)


class Groups:
    """The experts' row ranges of one call (from the host counts), reused by its GEMMs."""

    def __init__(self, counts: list[int]):
        c = np.asarray(counts, dtype=np.int64)
        self.E = len(counts)
        self.counts = np.ascontiguousarray(c)
        self.start = np.cumsum(c) - c
        self.nz = np.flatnonzero(c)  # row GEMMs skip the experts without rows
        self.m_nz = np.ascontiguousarray(c[self.nz])

    def rows_mm(self, *abouts: tuple[Tensor, Tensor, Tensor], beta: float = 0.0) -> None:
        """For each (a_NK, b_EKn, out_Nn): out rows of expert e (+)= a rows of e @ b[e]; b may
        be a transposed view ([E, n, K] with unit stride in K)."""
        for a, b, out in abouts:
            self.rows_mm_sum([(a, b)], out, beta)

    def rows_mm_sum(self, pairs: list[tuple[Tensor, Tensor]], out: Tensor, beta: float = 0.0):
        """out rows of expert e (+)= sum over (a_NK, b_EKn) of a rows of e @ b[e], in one pass
        over out (at most two pairs, of the same shapes and strides)."""
        if beta not in (0.0, 1.0):
            raise ValueError(f"rows_mm: beta must be 0 or 1, got {beta}")
        if not 1 <= len(pairs) <= 2:
            raise ValueError(f"rows_mm_sum takes one or two pairs, got {len(pairs)}")
        (a, b), second = pairs[0], pairs[1] if len(pairs) == 2 else None
        assert _fp32_cpu(a, b, out) and a.stride(1) == 1 and out.stride(1) == 1
        if second is not None and (
            (second[0].shape, second[0].stride()) != (a.shape, a.stride())
            or (second[1].shape, second[1].stride()) != (b.shape, b.stride())
        ):  # one pass needs one layout (weights sliced from a wider tensor may differ): two
            self.rows_mm_sum([pairs[0]], out, beta)
            self.rows_mm_sum([second], out, 1.0)
            return
        K, n = b.shape[1], b.shape[2]
        if b.stride(2) == 1:
            trans_b, ldb = 0, b.stride(1)
        else:
            assert b.stride(1) == 1, "b needs one unit stride in its last two dims"
            trans_b, ldb = 1, b.stride(2)
        rows, experts = self.start[self.nz], self.nz
        A, B = _ptrs(a.data_ptr(), rows, a.stride(0)), _ptrs(b.data_ptr(), experts, b.stride(0))
        A2 = B2 = None
        if second is not None:
            A2 = _ptrs(second[0].data_ptr(), rows, a.stride(0))
            B2 = _ptrs(second[1].data_ptr(), experts, b.stride(0))
        C = _ptrs(out.data_ptr(), rows, out.stride(0))
        err = _load()[0].smk_rows(
            len(self.nz), self.m_nz.ctypes.data, A.ctypes.data, B.ctypes.data,
            None if A2 is None else A2.ctypes.data, None if B2 is None else B2.ctypes.data,
            C.ctypes.data, n, K, a.stride(0), ldb, out.stride(0), trans_b, int(beta),
            torch.get_num_threads(),
        )  # fmt: skip
        if err:
            raise RuntimeError(f"smk_rows failed ({err}): out of memory for its buffers")

    def weights_mm(self, *pairs: tuple[Tensor, Tensor], outs: list[Tensor] | None = None):
        """For each (a_NK, b_Nn): [E, K, n], expert e's a rows transposed @ its b rows; zeros
        for empty experts. ``outs``: contiguous [E, K, n] tensors to write instead of new ones."""
        if outs is None:
            outs = [a.new_empty(self.E, a.shape[1], b.shape[1]) for a, b in pairs]
        lib = _load()[0]
        experts = np.arange(self.E)
        for (a, b), out in zip(pairs, outs):
            if out.shape != (self.E, a.shape[1], b.shape[1]) or not out.is_contiguous():
                raise ValueError(
                    f"weights_mm: out must be a contiguous {(self.E, a.shape[1], b.shape[1])}"
                )
            assert _fp32_cpu(a, b, out) and a.stride(1) == 1 and b.stride(1) == 1
            A = _ptrs(a.data_ptr(), self.start, a.stride(0))
            B = _ptrs(b.data_ptr(), self.start, b.stride(0))
            C = _ptrs(out.data_ptr(), experts, out.stride(0))
            lib.smk_weights(
                self.E, self.counts.ctypes.data, A.ctypes.data, B.ctypes.data, C.ctypes.data,
                a.shape[1], b.shape[1], a.stride(0), b.stride(0), out.stride(1),
                torch.get_num_threads(),
            )  # fmt: skip
        return outs
