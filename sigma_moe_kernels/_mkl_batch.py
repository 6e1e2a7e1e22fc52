"""Grouped fp32 GEMMs on CPU through MKL's ``cblas_sgemm_batch``: one call computes every
expert's product, each expert a group of its own size, and MKL spreads the experts over the
OpenMP threads (each product single-threaded) instead of splitting every small product over
both threads as the per-expert loop inside ``torch._grouped_mm`` (CPU) does.

The MKL is the one inside torch's CPU wheel (``libtorch_cpu.so`` exports the CBLAS batch
interface, LP64 integers); without it (another BLAS, an ARM build) ``available()`` is False and
the caller keeps ``torch._grouped_mm``. Written by hand because torch exposes only uniform
batches (``torch.bmm``): no library wraps MKL's grouped batch for tensors.

Measured on this 2-core EPYC VM (torch 2.13 CPU, 2 threads), demo sizes N=2048 rows, D=256,
F=128, E=96, one GEMM, medians of 30: x @ W[e] 2.8 ms vs 3.9 ms for ``torch._grouped_mm``
(balanced), 2.6-3.3 vs 4.2-5.5 ms with one expert holding a quarter of the rows; one dense GEMM
of the same FLOPs is 1.15 ms (the rest is each expert's weight panel packed for ~21 rows).
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import torch
from torch import Tensor

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_P = ctypes.c_void_p


@functools.cache
def _sgemm_batch():
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [_P] * 13 + [ctypes.c_int, _P]
    return fn


def available() -> bool:
    return _sgemm_batch() is not None


def _fp32_cpu(*ts: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


def _i32(v, g: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(v, dtype=np.int32), (g,))


def _pieces(lengths: np.ndarray, parts: np.ndarray):
    """Cut each length L_i into parts_i nearly equal pieces: (i, offset, size) per piece."""
    owner = np.repeat(np.arange(len(lengths)), parts)
    j = np.arange(len(owner)) - np.repeat(np.cumsum(parts) - parts, parts)
    length = lengths[owner]
    size = -(-length // parts[owner])
    lo = np.minimum(j * size, length)
    return owner, lo, np.minimum(size, length - lo)


class Groups:
    """The experts' row ranges of one call (from the host counts), reused by its GEMMs.

    MKL runs each product of a batch on one thread, so an expert holding most rows (early
    training: max/mean load 15-30 at E=96) would leave the other thread idle: an expert with
    more than a quarter-thread's share of rows is split, by rows for the row GEMMs and by
    output rows (K) for the weight GEMMs."""

    def __init__(self, counts: list[int]):
        c = np.asarray(counts, dtype=np.int64)
        self.E = len(counts)
        self.nz = np.flatnonzero(c)  # the experts with rows; MKL gets only these
        self.m, self.start = c[self.nz], (np.cumsum(c) - c)[self.nz]
        share = max(64, -(-int(c.sum()) // (2 * torch.get_num_threads())))
        self.parts = -(-self.m // share)  # pieces per non-empty expert (1 unless it is large)
        # row GEMMs: each expert's rows cut into `parts` pieces (output rows: at call time)
        i, lo, self.r_m = _pieces(self.m, self.parts)
        self.r_e, self.r_start = self.nz[i], self.start[i] + lo
        # runs [e0, e1) of empty experts, whose weight gradients are zero-filled
        empty = np.concatenate([[False], c == 0, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(empty))
        self.empty_runs = list(zip(edges[::2].tolist(), edges[1::2].tolist()))

    @staticmethod
    def _call(*specs) -> None:
        """One MKL call for every product of every spec (ta, tb, m, n, k, a, lda, b, ldb,
        beta, c, ldc): products of one spec must not write the same output elements twice."""
        cols = []
        for ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc in specs:
            g = len(a)
            cols.append([
                _i32(ta, g), _i32(tb, g), _i32(m, g), _i32(n, g), _i32(k, g),
                np.ones(g, dtype=np.float32), np.asarray(a, dtype=np.uint64), _i32(lda, g),
                np.asarray(b, dtype=np.uint64), _i32(ldb, g), np.full(g, beta, dtype=np.float32),
                np.asarray(c, dtype=np.uint64), _i32(ldc, g),
            ])  # fmt: skip
        arrs = [np.ascontiguousarray(np.concatenate(parts)) for parts in zip(*cols)]
        g = len(arrs[0])
        if g:
            ones = np.ones(g, dtype=np.int32)
            _sgemm_batch()(_ROW_MAJOR, *[x.ctypes.data for x in arrs], g, ones.ctypes.data)

    def _rows_spec(self, a_NK: Tensor, b_EKn: Tensor, out_Nn: Tensor, beta: float):
        assert _fp32_cpu(a_NK, b_EKn, out_Nn) and a_NK.stride(1) == 1 and out_Nn.stride(1) == 1
        K, n = b_EKn.shape[1], b_EKn.shape[2]
        if b_EKn.stride(2) == 1:
            tb, ldb = _NO_TRANS, b_EKn.stride(1)
        else:
            assert b_EKn.stride(1) == 1, "b needs one unit stride in its last two dims"
            tb, ldb = _TRANS, b_EKn.stride(2)
        a = a_NK.data_ptr() + self.r_start * a_NK.stride(0) * 4
        b = b_EKn.data_ptr() + self.r_e * b_EKn.stride(0) * 4
        c = out_Nn.data_ptr() + self.r_start * out_Nn.stride(0) * 4
        lda, ldc = a_NK.stride(0), out_Nn.stride(0)
        return _NO_TRANS, tb, self.r_m, n, K, a, lda, b, ldb, beta, c, ldc

    def rows_mm(self, *abouts: tuple[Tensor, Tensor, Tensor], beta: float = 0.0) -> None:
        """For each (a_NK, b_EKn, out_Nn), in one MKL call: out rows of expert e (+)= a rows
        of e @ b[e]; b may be a transposed view. The outs must be distinct tensors."""
        self._call(*[self._rows_spec(a, b, out, beta) for a, b, out in abouts])

    def rows_mm_sum(self, pairs: list[tuple[Tensor, Tensor]], out: Tensor, beta: float = 0.0):
        """out rows of expert e (+)= sum over (a_NK, b_EKn) of a rows of e @ b[e]."""
        for i, (a, b) in enumerate(pairs):
            self.rows_mm((a, b, out), beta=beta if i == 0 else 1.0)

    def _weights_spec(self, a_NK: Tensor, b_Nn: Tensor, out: Tensor):
        assert _fp32_cpu(a_NK, b_Nn) and a_NK.stride(1) == 1 and b_Nn.stride(1) == 1
        K, n = a_NK.shape[1], b_Nn.shape[1]
        parts = np.minimum(self.parts, max(1, K // 16))
        i, k0, kk = _pieces(np.full(len(self.nz), K), parts)
        e, start, m = self.nz[i], self.start[i], self.m[i]
        a = a_NK.data_ptr() + (start * a_NK.stride(0) + k0) * 4
        b = b_Nn.data_ptr() + start * b_Nn.stride(0) * 4
        c = out.data_ptr() + (e * K * n + k0 * n) * 4
        return _TRANS, _NO_TRANS, kk, n, m, a, a_NK.stride(0), b, b_Nn.stride(0), 0.0, c, n

    def weights_mm(self, *pairs: tuple[Tensor, Tensor], outs: list[Tensor] | None = None):
        """For each (a_NK, b_Nn), in one MKL call: [E, K, n], expert e's a rows transposed @
        its b rows; zeros for empty experts. ``outs``: contiguous [E, K, n] tensors (views of
        a larger weight gradient, for example) to write instead of new ones."""
        if outs is None:
            outs = [a.new_empty(self.E, a.shape[1], b.shape[1]) for a, b in pairs]
        for (a, b), out in zip(pairs, outs):
            if out.shape != (self.E, a.shape[1], b.shape[1]) or not out.is_contiguous():
                raise ValueError(
                    f"weights_mm: out must be a contiguous {(self.E, a.shape[1], b.shape[1])}"
                )
        for out in outs:  # one slice per run: one fill per empty expert costs ~85 us each
            for e0, e1 in self.empty_runs:
                out[e0:e1].zero_()
        self._call(*[self._weights_spec(a, b, out) for (a, b), out in zip(pairs, outs)])
        return outs
