"""grouped_swiglu, torch implementation (the CPU path): MKL's grouped batch GEMM for fp32
(``_mkl_batch``), else ``torch._grouped_mm`` where it accepts the operands, else "ranged bmm"
(contiguous expert ranges, each padded to its own largest expert, one ``torch.bmm`` per GEMM
per range).  Manual backward; one host sync
(``tokens_per_expert.tolist()``).  The op, its checks and autograd live in ``grouped_swiglu.py``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cgemm, _mkl_batch


def _counts_list(counts_E: Tensor, N: int) -> list[int]:
    counts = counts_E.tolist()  # the single host sync of the torch path
    if any(c < 0 for c in counts) or sum(counts) != N:
        raise ValueError(
            f"tokens_per_expert_E must be >= 0 and sum to the experts' {N} input rows "
            "(x_sorted_ND's rows, or len(gather_N)), "
            f"got sum {sum(counts)}"
        )
    return counts


# ----------------------------------------------------------------------------------------------
# torch backend (the fast CPU path)
#
# Why this design (measured on this 2-core EPYC VM, torch 2.13 CPU, 2 threads, T=4096 D=512
# F=256 E=96 top-1 fp32, random routing: max expert load 63 rows, mean 43; full tables in
# docs/benchmarks/2026-11-23-cpu.md, alternatives timed by `sigma-moe bench kernels`):
#   * one torch.mm per expert (the obvious loop; 9 GEMM calls per expert per step = 864 calls)
#     ran the forward projections at ~4x the time of one dense GEMM of the same FLOPs (97 ms vs
#     24 ms): each small call pays an OpenMP fork/join and packs a 512 KB weight panel for only
#     ~43 rows, and the fork/joins suffer most when the two cores are shared.
#   * one torch.bmm over an [E, C, D] buffer padded to the largest expert runs at ~dense per-row
#     speed (38 ms for 96*63 padded rows vs 24 ms dense for 4096 rows) but pays for the padding
#     (x1.48 rows here, up to x E when one expert takes every token) in time and memory.
#   * kept: "ranged bmm".  Experts are split into contiguous index ranges [e0, e1) (so a range's
#     weights are a view, never a copy); each range is padded only to its own largest expert
#     and runs as one bmm per GEMM.  The split minimises
#         sum over ranges (ALPHA + (e1 - e0) * max count in range)
#     (ALPHA = the cost of one more call, in rows) with an O(E^2) dynamic programme in numpy on
#     the host counts (the single host sync).  Padding is per range and transient (a range
#     whose experts all have the same count -- e.g. a one-expert range -- uses views, no copy),
#     so what is saved for backward is compact: x_sorted, h_gate, h_up (N rows).  The SwiGLU
#     backward runs per range too, so its temporaries are range-sized: this keeps the layer's
#     peak memory near the dense FFN's (a whole-N elementwise backward cost ~+50 MB here).
# ----------------------------------------------------------------------------------------------
# One more bmm range costs about as much as ALPHA padded rows of work: a per-call cost (OpenMP
# fork/join, weight packing) measured in multiply-adds per row, so ALPHA in rows falls as D x F
# grows. Re-measured 2026-12-01 in a whole demo-cpu training step (E=96, D=256, F=128, real
# batches, early-training imbalance: expert load max/mean 15-80), in-process A/B medians:
# (ALPHA, range cap) = (48, 512 rows) 1.00, (128, 2048) 1.13x the step speed, (256, 4096) 1.13x,
# (1024, 8192) 1.05x. Kept: 128 rows at D x F = 256 x 128, i.e. 4.2 M multiply-adds per call,
# and a cap of 2048 rows at D = 256 (512 K elements per padded D-wide temporary, 2 MB fp32).
_CALL_COST_MACS = 128 * 256 * 128
_MAX_RANGE_ELEMS = 2048 * 256


def _alpha_rows(D: int, F: int) -> int:
    return max(16, _CALL_COST_MACS // max(D * F, 1))


def _max_range_rows(D: int) -> int:
    return max(256, _MAX_RANGE_ELEMS // max(D, 1))


def _plan(counts: list[int], alpha: int, max_rows: int):
    """Split experts into contiguous ranges; returns [(e0, e1, cap, padded_row0)], P."""
    c = np.asarray(counts, dtype=np.int64)
    E = len(counts)
    best = np.zeros(E + 1, dtype=np.float64)
    arg = np.zeros(E + 1, dtype=np.int64)
    for j in range(1, E + 1):
        # candidate ranges [i, j) for i = 0..j-1; cap(i) = max(c[i:j])
        caps = np.maximum.accumulate(c[:j][::-1])[::-1]
        cost = best[:j] + alpha + (j - np.arange(j)) * caps
        cost = np.where(caps == 0, best[:j], cost)  # an all-empty range costs nothing
        too_big = (j - np.arange(j)) * caps > max_rows
        too_big[j - 1] = False  # a single expert is always allowed
        cost = np.where(too_big, np.inf, cost)
        i = int(np.argmin(cost))
        best[j], arg[j] = cost[i], i
    ranges, j = [], E
    while j > 0:
        i = int(arg[j])
        ranges.append((i, j, int(c[i:j].max())))
        j = i
    ranges.reverse()
    out, p = [], 0
    for e0, e1, cap in ranges:
        out.append((e0, e1, cap, p))
        p += (e1 - e0) * cap
    return out, p


class _Range:
    """One range of experts: rows [r0, r1) of the sorted input, padded to [n, cap, .]."""

    __slots__ = ("e0", "e1", "n", "cap", "r0", "r1", "idx")

    def __init__(self, e0, e1, cap, counts, offs, device):
        self.e0, self.e1, self.n, self.cap = e0, e1, e1 - e0, cap
        self.r0, self.r1 = offs[e0], offs[e1]
        if all(counts[e] == cap for e in range(e0, e1)):
            self.idx = None  # already uniform: padded layout == sorted layout (views only)
        else:
            idx = [j * cap + i for j, e in enumerate(range(e0, e1)) for i in range(counts[e])]
            self.idx = torch.tensor(idx, dtype=torch.int64, device=device)

    def pad(self, t: Tensor) -> Tensor:
        """rows [r0, r1) of t -> [n, cap, cols] (zero rows where an expert has fewer)."""
        rows = t[self.r0 : self.r1]
        if self.idx is None:
            return rows.view(self.n, self.cap, t.shape[1])
        out = t.new_zeros(self.n * self.cap, t.shape[1])
        out.index_copy_(0, self.idx, rows)
        return out.view(self.n, self.cap, t.shape[1])

    def out_buffer(self, t: Tensor) -> Tensor:
        """Where a bmm writes rows [r0, r1) of t: t itself when uniform, else a temporary."""
        if self.idx is None:
            return t[self.r0 : self.r1].view(self.n, self.cap, t.shape[1])
        return t.new_empty(self.n, self.cap, t.shape[1])

    def unpad_into(self, buf: Tensor, t: Tensor) -> None:
        if self.idx is not None:
            torch.index_select(buf.view(-1, t.shape[1]), 0, self.idx, out=t[self.r0 : self.r1])


def _ranges(counts: list[int], device, alpha: int, max_rows: int) -> list[_Range]:
    # with many rows (top-8: N = 8T) a fixed row cap degenerates into one bmm per expert;
    # let ranges grow with N (temporaries stay ~1/16 of an N-row activation)
    max_rows = max(max_rows, sum(counts) // 16)
    plan, _ = _plan(counts, alpha, max_rows)
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    return [_Range(e0, e1, cap, counts, offs, device) for e0, e1, cap, _ in plan if cap > 0]


def _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, alpha=None, max_rows=None):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    alpha = alpha or _alpha_rows(D, Fdim)
    max_rows = max_rows or _max_range_rows(D)
    counts = _counts_list(counts_E, N)
    x_ND = x_ND.contiguous()
    hg = x_ND.new_empty(N, Fdim)
    hu = x_ND.new_empty(N, Fdim)
    y = x_ND.new_empty(N, D)
    for r in _ranges(counts, x_ND.device, alpha, max_rows):
        xr = r.pad(x_ND)
        hgr, hur = r.out_buffer(hg), r.out_buffer(hu)
        torch.bmm(xr, wg_EDF[r.e0 : r.e1], out=hgr)
        torch.bmm(xr, wu_EDF[r.e0 : r.e1], out=hur)
        ar = F.silu(hgr).mul_(hur)
        yr = r.out_buffer(y)
        torch.bmm(ar, wd_EFD[r.e0 : r.e1], out=yr)
        r.unpad_into(hgr, hg)
        r.unpad_into(hur, hu)
        r.unpad_into(yr, y)
    return y, hg, hu


def _swiglu_bwd(dA: Tensor, hg: Tensor, hu: Tensor):
    """(dA, h_gate, h_up) -> (a, d h_gate, d h_up); fp32 math for 16-bit inputs."""
    acc = torch.promote_types(hg.dtype, torch.float32)
    hg32, hu32, dA32 = hg.to(acc), hu.to(acc), dA.to(acc)
    sg = torch.sigmoid(hg32)
    silu = hg32 * sg
    a = (silu * hu32).to(hg.dtype)
    dhu = (dA32 * silu).to(hg.dtype)
    # d silu/dh = sg * (1 + h * (1 - sg))
    dsilu = silu.neg_().add_(hg32).mul_(sg).add_(sg)  # sg + h*sg*(1-sg), reusing silu's buffer
    dhg = dsilu.mul_(dA32).mul_(hu32).to(hg.dtype)
    return a, dhg, dhu


def _bwd_torch(
    dy_ND,
    x_ND,
    counts_E,
    wg_EDF,
    wu_EDF,
    wd_EFD,
    hg,
    hu,
    alpha=None,
    max_rows=None,
):
    N, D = x_ND.shape
    alpha = alpha or _alpha_rows(D, wg_EDF.shape[2])
    max_rows = max_rows or _max_range_rows(D)
    counts = _counts_list(counts_E, N)
    dy_ND = dy_ND.contiguous()
    x_ND = x_ND.contiguous()
    # weight grads: written by the bmm of their range; only experts outside every range (a run
    # of empty experts) need zeros -- zero-filling all 3 x 48 MB cost ~10 ms here
    dwg = torch.empty_like(wg_EDF)
    dwu = torch.empty_like(wu_EDF)
    dwd = torch.empty_like(wd_EFD)
    dx = torch.empty_like(x_ND)
    ranges = _ranges(counts, x_ND.device, alpha, max_rows)
    # zero the gaps between ranges (runs of empty experts) one slice per run: one zero_ per
    # empty expert was ~75 ms of a demo-cpu step at E=96 under early-training imbalance
    # (~60 empty experts per layer, 3 x 128 KB fills of ~85 us each, mostly OpenMP fork/join)
    e = 0
    for r0, r1 in [(r.e0, r.e1) for r in ranges] + [(len(counts), len(counts))]:
        if r0 > e:
            for dw in (dwg, dwu, dwd):
                dw[e:r0].zero_()
        e = r1
    for r in ranges:
        sl = slice(r.e0, r.e1)
        dyr = r.pad(dy_ND)
        dAr = torch.bmm(dyr, wd_EFD[sl].transpose(1, 2))
        ar, dhgr, dhur = _swiglu_bwd(dAr, r.pad(hg), r.pad(hu))
        del dAr
        torch.bmm(ar.transpose(1, 2), dyr, out=dwd[sl])
        del ar, dyr  # keep the range's live temporaries few (peak memory)
        xr = r.pad(x_ND)
        torch.bmm(xr.transpose(1, 2), dhgr, out=dwg[sl])
        torch.bmm(xr.transpose(1, 2), dhur, out=dwu[sl])
        dxr = r.out_buffer(dx)
        torch.bmm(dhgr, wg_EDF[sl].transpose(1, 2), out=dxr)
        dxr.baddbmm_(dhur, wu_EDF[sl].transpose(1, 2))
        r.unpad_into(dxr, dx)
    return dx, dwg, dwu, dwd


# torch._grouped_mm (torch >= 2.8 on CPU): one call per GEMM over the unpadded sorted rows, no
# host-side plan, no padding copies, so its cost does not depend on the routing balance.
# Measured on this 2-core VM (loaded, see docs/benchmarks/train-2026-12-01.md), demo sizes
# T=2048 D=256 F=128 E=96, forward, 2 threads: 20-29 ms vs 22-57 ms for the ranged bmm
# (balanced) and 45 vs 40 ms with one expert holding a quarter of the tokens; the ranged bmm is
# kept for shapes _grouped_mm refuses (strides or base addresses not multiples of 16 bytes,
# float64).
# On by default since 2026-12-01 (s4): in whole demo-cpu training steps (E=96, real batches,
# early-training imbalance), in-process alternating medians of 12 steps, quiet machine, it beat
# the ranged bmm: 673 vs 736 ms and 662 vs 731 ms a step (two runs). (An earlier layer-only
# timing on balanced routing had it level: 34.7 vs 33.1 ms fwd+bwd; the ranged bmm pays its
# padding and host plan under imbalance.) SIGMA_MOE_GROUPED_MM=0 turns it off.
_USE_GROUPED_MM = os.environ.get("SIGMA_MOE_GROUPED_MM", "1") == "1"


def _gmm_ok(*ts: Tensor) -> bool:
    if not _USE_GROUPED_MM:
        return False
    if ts[0].shape[0] == 0:  # no rows: _grouped_mm rejects the empty strides
        return False
    for t in ts:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.data_ptr() % 16:
            return False
        if any(st != 1 and (st * t.element_size()) % 16 for st in t.stride()):
            return False
    return hasattr(torch, "_grouped_mm")


def _offsets(counts_E: Tensor) -> Tensor:
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def _fwd_gmm(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    offs = _offsets(counts_E)
    hg = torch._grouped_mm(x_ND, wg_EDF, offs=offs)
    hu = torch._grouped_mm(x_ND, wu_EDF, offs=offs)
    a = F.silu(hg).mul_(hu)
    return torch._grouped_mm(a, wd_EFD, offs=offs), hg, hu


def _bwd_gmm(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu):
    offs = _offsets(counts_E)
    dA = torch._grouped_mm(dy_ND, wd_EFD.transpose(1, 2), offs=offs)
    a, dhg, dhu = _swiglu_bwd(dA, hg, hu)
    del dA
    # an expert with no rows gets zero weight gradients from _grouped_mm itself
    dwd = torch._grouped_mm(a.t(), dy_ND, offs=offs)
    del a
    dwg = torch._grouped_mm(x_ND.t(), dhg, offs=offs)
    dwu = torch._grouped_mm(x_ND.t(), dhu, offs=offs)
    dx = torch._grouped_mm(dhg, wg_EDF.transpose(1, 2), offs=offs)
    dx += torch._grouped_mm(dhu, wu_EDF.transpose(1, 2), offs=offs)
    return dx, dwg, dwu, dwd


def _groups(counts: list[int]):
    """The grouped GEMMs of one call: ``_cgemm`` (AVX-512, no weight packing) where it
    builds, else MKL's batch GEMM."""
    return _cgemm.Groups(counts) if _USE_CGEMM and _cgemm.available() else _mkl_batch.Groups(counts)


def _fwd_mkl(x_ND, counts, wg_EDF, wu_EDF, wd_EFD):
    g = _groups(counts)
    N, Fdim = x_ND.shape[0], wg_EDF.shape[2]
    hg, hu, y = x_ND.new_empty(N, Fdim), x_ND.new_empty(N, Fdim), torch.empty_like(x_ND)
    g.rows_mm((x_ND, wg_EDF, hg), (x_ND, wu_EDF, hu))  # gate and up in one batch
    g.rows_mm((F.silu(hg).mul_(hu), wd_EFD, y))
    return y, hg, hu


# The backward runs over contiguous chunks of experts of about this many bytes of D-wide rows,
# so its temporaries (dA, the SwiGLU backward's [rows, F] tensors, and with a gather index the
# rows of x and of dx) are one chunk's, not N rows'. Measured 2026-12-06 (s8), the `bench layer`
# MoE (T=4096, D=512, F=256, E=96, top-1) with the gather fused (`gather_N`), peak activation
# memory of fwd+bwd / in-process alternating medians of 12: one chunk 45.6 MB / 107.5 ms; 4 MiB
# (2 chunks) 43.6 MB / 117 ms; 2 MiB (4 chunks) 35.7 MB / 113 ms; 1 MiB 35.7 MB / 124 ms; the
# unfused permute + experts as before 53.6 MB / 113 ms; the dense FFN 32.0 MB / 57.5 ms.
_CHUNK_BYTES = 2 * 2**20


def _chunks(counts: list[int], D: int) -> list[tuple[int, int, int, int]]:
    """Contiguous expert ranges [(e0, e1, r0, r1)]: experts join a chunk until it holds at
    least _CHUNK_BYTES of D-wide fp32 rows (the expert that crosses the mark closes it, however
    large; the last chunk may be smaller)."""
    target = max(1, _CHUNK_BYTES // (4 * max(D, 1)))
    out, e0, r0, rows = [], 0, 0, 0
    for e, c in enumerate(counts):
        rows += c
        if rows >= target or e == len(counts) - 1:
            out.append((e0, e + 1, r0, r0 + rows))
            e0, r0, rows = e + 1, r0 + rows, 0
    return out


def _bwd_mkl(dy_ND, x_ND, counts, wg_EDF, wu_EDF, wd_EFD, hg, hu, gather_N=None):
    """Chunk by chunk of experts (``_chunks``). With ``gather_N`` the experts' input row r is
    ``x_ND[gather_N[r]]`` (gathered per chunk) and dx comes back in x's row order."""
    # contiguous whatever the weights' layout: MKL writes each expert's [K, n] block whole
    dwg, dwu, dwd = (w.new_empty(w.shape) for w in (wg_EDF, wu_EDF, wd_EFD))
    if gather_N is None:
        dx = torch.empty_like(x_ND)
    else:  # a row of x used by several expert rows (top-k > 1) sums their gradients
        dx = torch.zeros_like(x_ND)
    for e0, e1, r0, r1 in _chunks(counts, x_ND.shape[1]):
        g, ex = _groups(counts[e0:e1]), slice(e0, e1)
        dy, dA = dy_ND[r0:r1], hg.new_empty(r1 - r0, hg.shape[1])
        g.rows_mm((dy, wd_EFD[ex].transpose(1, 2), dA))
        a, dhg, dhu = _swiglu_bwd(dA, hg[r0:r1], hu[r0:r1])
        del dA
        g.weights_mm((a, dy), outs=[dwd[ex]])
        del a
        x = x_ND[r0:r1] if gather_N is None else x_ND.index_select(0, gather_N[r0:r1])
        g.weights_mm((x, dhg), (x, dhu), outs=[dwg[ex], dwu[ex]])
        dx_c = dx[r0:r1] if gather_N is None else x
        g.rows_mm_sum([(dhg, wg_EDF[ex].transpose(1, 2)), (dhu, wu_EDF[ex].transpose(1, 2))], dx_c)
        if gather_N is not None:
            dx.index_add_(0, gather_N[r0:r1], dx_c)
    return dx, dwg, dwu, dwd


# MKL's grouped batch GEMM (``_mkl_batch``) ahead of torch._grouped_mm for fp32 on CPU where
# torch's MKL exports it; SIGMA_MOE_MKL_BATCH=0 turns it off. Measured 2026-12-01 (s5), 2-core
# VM, fwd+bwd of one layer, alternating medians: on the 64 expert loads of a real demo-cpu run's
# first 16 steps (E=96, D=256, F=128, max/mean load 4-30) 29-34 ms vs 36-51 ms for
# _grouped_mm; at the layer benchmark's T=4096 D=512 F=256 207-227 vs 242-262 ms; whole
# demo-cpu steps (in-process A/B, 24 steps) 747 vs 785 and 796 vs 856 ms.
_USE_MKL_BATCH = os.environ.get("SIGMA_MOE_MKL_BATCH", "1") == "1"
# ``_cgemm`` (csrc/grouped_gemm.c) ahead of MKL's batch where it builds (x86-64 with AVX-512 and
# a C compiler); SIGMA_MOE_CGEMM=0 turns it off. Measured 2026-12-06 (s9), 2-core EPYC VM, one
# process, T=4096 D=512 F=256 E=96 top-1: see _cgemm's docstring per GEMM and
# docs/benchmarks/train-2026-12-06.md for the layer and whole training steps.
_USE_CGEMM = os.environ.get("SIGMA_MOE_CGEMM", "1") == "1"


def _mkl_ok(*ts: Tensor) -> bool:
    """Whether the chunked fp32 path (``_fwd_mkl`` / ``_bwd_mkl``) runs: on ``_cgemm`` or on
    MKL's batch GEMM."""
    return (
        (_USE_CGEMM and _cgemm.available()) or (_USE_MKL_BATCH and _mkl_batch.available())
    ) and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in ts)


def _fwd_torch_best(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, gather_N=None):
    """``gather_N``: the experts' input row r is ``x_ND[gather_N[r]]`` (gathered here, a
    temporary; the op saves x_ND and the index, not the gathered rows)."""
    if gather_N is not None:
        x_ND = x_ND.index_select(0, gather_N)
    counts = _counts_list(counts_E, x_ND.shape[0])  # the bad-counts check of the torch path
    x_ND = x_ND.contiguous()
    if _mkl_ok(x_ND, wg_EDF, wu_EDF, wd_EFD):
        return _fwd_mkl(x_ND, counts, wg_EDF, wu_EDF, wd_EFD)
    if _gmm_ok(x_ND, wg_EDF, wu_EDF, wd_EFD):
        return _fwd_gmm(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)
    return _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)


def _bwd_torch_best(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu, gather_N=None):
    dy_ND, x_ND = dy_ND.contiguous(), x_ND.contiguous()
    if _mkl_ok(dy_ND, x_ND, wg_EDF, wu_EDF, wd_EFD, hg, hu):
        counts = _counts_list(counts_E, dy_ND.shape[0])
        return _bwd_mkl(dy_ND, x_ND, counts, wg_EDF, wu_EDF, wd_EFD, hg, hu, gather_N)
    return gathered_bwd(_bwd_other, x_ND, gather_N, dy_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu)


def _bwd_other(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu):
    """The backward where MKL's batch is not available: torch._grouped_mm, else ranged bmm."""
    args = (dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu)
    if _gmm_ok(dy_ND, x_ND, wg_EDF, wu_EDF, wd_EFD, hg, hu):
        _counts_list(counts_E, x_ND.shape[0])
        return _bwd_gmm(*args)
    return _bwd_torch(*args)


def gathered_bwd(bwd, x_ND, gather_N, dy_ND, *rest):
    """Run ``bwd(dy, x_sorted, *rest)`` on the gathered rows and bring dx back to x's rows
    (what a backend without its own gather does: the whole N x D gathered at once)."""
    if gather_N is None:
        return bwd(dy_ND, x_ND, *rest)
    dx_sorted, *dws = bwd(dy_ND, x_ND.index_select(0, gather_N), *rest)
    return (torch.zeros_like(x_ND).index_add_(0, gather_N, dx_sorted), *dws)
