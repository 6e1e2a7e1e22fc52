"""Grouped SwiGLU experts over expert-sorted rows (op family ``grouped_swiglu``).

``grouped_swiglu(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)`` -> ``y_ND``
where, for expert e owning rows ``[off_e, off_e + n_e)`` (``off`` = exclusive cumsum of
``tokens_per_expert_E``): ``y = (silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e]``.  Experts with zero
tokens are legal (their weight gradients are zero).  Gradients: x and all three weights.

Saved for backward: x_sorted and the two pre-activations ``h_gate_NF`` and ``h_up_NF``;
``silu(h_gate)*h_up`` is recomputed in backward (one cheap elementwise pass) instead of being
saved, which keeps the layer's peak memory near a dense FFN's.

Backends
* torch: one host sync (``tokens_per_expert.tolist()``), then "ranged bmm": contiguous ranges of
  experts, each padded to its own largest expert, one ``torch.bmm`` per GEMM per range, written
  into preallocated outputs (``out=``), manual backward.  See the comment above ``_plan`` for
  the measured alternatives.
* triton / interpret: grouped GEMM kernels driven by a device-side tile schedule (no host
  sync): tile i covers BLOCK_M rows of one expert; a fused gate+up kernel (two accumulators,
  SwiGLU epilogue), a generic grouped GEMM (used for the down projection, for dA with the
  SwiGLU-backward epilogue, and for dX with two accumulated products) and a grouped weight-grad
  kernel (one program per expert x tile of the weight, looping over the expert's rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import HAS_TRITON, check_tile, resolve_backend

# tile configs per GEMM role (BLOCK_M, the autotune sets) and the fp32 dot precision
from ._gemm_tiles import _BLOCK_M, _LAUNCH_CONFIGS, _ROLE_KERNEL, check_precision, resolve_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["grouped_swiglu", "grouped_swiglu_reference"]


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def grouped_swiglu_reference(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Naive reference: python loop over experts with plain autograd."""
    _check_args(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)
    outs, s = [], 0
    for e, n in enumerate(tokens_per_expert_E.tolist()):
        xe = x_sorted_ND[s : s + n]
        outs.append((F.silu(xe @ w_gate_EDF[e]) * (xe @ w_up_EDF[e])) @ w_down_EFD[e])
        s += n
    if not outs:
        return x_sorted_ND.new_zeros(0, x_sorted_ND.shape[1])
    return torch.cat(outs, dim=0)


def _shape(t):
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check_args(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD) -> None:
    for name, t, nd in (
        ("x_sorted_ND", x_ND, 2),
        ("tokens_per_expert_E", counts_E, 1),
        ("w_gate_EDF", wg_EDF, 3),
        ("w_up_EDF", wu_EDF, 3),
        ("w_down_EFD", wd_EFD, 3),
    ):
        if not isinstance(t, Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {_shape(t)}")
    if counts_E.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens_per_expert_E must be int64 (or int32), got {counts_E.dtype}")
    N, D = x_ND.shape
    E, Dg, Fg = wg_EDF.shape
    if counts_E.shape[0] != E:
        raise ValueError(
            f"tokens_per_expert_E has {counts_E.shape[0]} entries but w_gate_EDF has E={E}"
        )
    if Dg != D:
        raise ValueError(f"w_gate_EDF is [E, {Dg}, F] but x_sorted_ND has D={D}")
    if tuple(wu_EDF.shape) != (E, D, Fg):
        raise ValueError(f"w_up_EDF must be {(E, D, Fg)} like w_gate_EDF, got {_shape(wu_EDF)}")
    if tuple(wd_EFD.shape) != (E, Fg, D):
        raise ValueError(f"w_down_EFD must be {(E, Fg, D)}, got {_shape(wd_EFD)}")
    if not x_ND.is_floating_point():
        raise ValueError(f"x_sorted_ND must be floating point, got {x_ND.dtype}")
    for name, w in (("w_gate_EDF", wg_EDF), ("w_up_EDF", wu_EDF), ("w_down_EFD", wd_EFD)):
        if w.dtype != x_ND.dtype:
            raise ValueError(f"{name} dtype {w.dtype} != x_sorted_ND dtype {x_ND.dtype}")
        if w.device != x_ND.device:
            raise ValueError(f"{name} is on {w.device} but x_sorted_ND is on {x_ND.device}")


def _counts_list(counts_E: Tensor, N: int) -> list[int]:
    counts = counts_E.tolist()  # the single host sync of the torch path
    if any(c < 0 for c in counts) or sum(counts) != N:
        raise ValueError(
            f"tokens_per_expert_E must be >= 0 and sum to x_sorted_ND's {N} rows, "
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
_ALPHA_ROWS = 48  # one more bmm range ~ 48 padded rows of work (see the benchmark docs)
# A range's padded temporaries live only while it runs; capping a range at 1024 padded rows
# bounds them to ~2 MB per D-wide buffer (a single 4,700-row range held ~46 MB of temporaries in
# the SwiGLU backward and pushed the MoE layer's peak to 1.7x the dense FFN's).
_MAX_RANGE_ROWS = 512


def _plan(counts: list[int], alpha: int = _ALPHA_ROWS, max_rows: int = _MAX_RANGE_ROWS):
    """Split experts into contiguous ranges; returns [(e0, e1, cap, padded_row0)], P."""
    import numpy as np

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


def _ranges(
    counts: list[int], device, alpha: int = _ALPHA_ROWS, max_rows: int = _MAX_RANGE_ROWS
) -> list[_Range]:
    # with many rows (top-8: N = 8T) a fixed 512-row cap degenerates into one bmm per expert;
    # let ranges grow with N (temporaries stay ~1/16 of an N-row activation)
    max_rows = max(max_rows, sum(counts) // 16)
    plan, _ = _plan(counts, alpha, max_rows)
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    return [_Range(e0, e1, cap, counts, offs, device) for e0, e1, cap, _ in plan if cap > 0]


def _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, alpha=_ALPHA_ROWS, max_rows=_MAX_RANGE_ROWS):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
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
    alpha=_ALPHA_ROWS,
    max_rows=_MAX_RANGE_ROWS,
):
    N, D = x_ND.shape
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
    covered = [False] * len(counts)
    for r in ranges:
        covered[r.e0 : r.e1] = [True] * r.n
    for e, c in enumerate(covered):
        if not c:
            dwg[e].zero_()
            dwu[e].zero_()
            dwd[e].zero_()
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
def _gmm_ok(*ts: Tensor) -> bool:
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


def _fwd_torch_best(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    _counts_list(counts_E, x_ND.shape[0])  # the bad-counts check of the torch path
    x_ND = x_ND.contiguous()
    if _gmm_ok(x_ND, wg_EDF, wu_EDF, wd_EFD):
        return _fwd_gmm(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)
    return _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)


def _bwd_torch_best(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu):
    args = (dy_ND.contiguous(), x_ND.contiguous(), counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu)
    if _gmm_ok(args[0], args[1], wg_EDF, wu_EDF, wd_EFD, hg, hu):
        _counts_list(counts_E, x_ND.shape[0])
        return _bwd_gmm(*args)
    return _bwd_torch(*args)


# The per-expert loop, kept for the benchmark's "alternatives" table (see above for why it lost).
def _fwd_torch_loop(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    counts = _counts_list(counts_E, N)
    x_ND = x_ND.contiguous()
    hg_NF = x_ND.new_empty(N, Fdim)
    hu_NF = x_ND.new_empty(N, Fdim)
    y_ND = x_ND.new_empty(N, D)
    s = 0
    for e, n in enumerate(counts):
        if n:
            xe = x_ND[s : s + n]
            torch.mm(xe, wg_EDF[e], out=hg_NF[s : s + n])
            torch.mm(xe, wu_EDF[e], out=hu_NF[s : s + n])
            s += n
    a_NF = F.silu(hg_NF).mul_(hu_NF)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NF[s : s + n], wd_EFD[e], out=y_ND[s : s + n])
            s += n
    return y_ND, hg_NF, hu_NF


def _bwd_torch_loop(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF):
    N, D = x_ND.shape
    counts = _counts_list(counts_E, N)
    dy_ND = dy_ND.contiguous()
    x_ND = x_ND.contiguous()
    dA_NF = torch.empty_like(hg_NF)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(dy_ND[s : s + n], wd_EFD[e].t(), out=dA_NF[s : s + n])
            s += n
    a_NF, dhg_NF, dhu_NF = _swiglu_bwd(dA_NF, hg_NF, hu_NF)
    dwg = torch.zeros_like(wg_EDF)
    dwu = torch.zeros_like(wu_EDF)
    dwd = torch.zeros_like(wd_EFD)
    dx_ND = torch.empty_like(x_ND)
    s = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(s, s + n)
        xe_t = x_ND[sl].t()
        torch.mm(a_NF[sl].t(), dy_ND[sl], out=dwd[e])
        torch.mm(xe_t, dhg_NF[sl], out=dwg[e])
        torch.mm(xe_t, dhu_NF[sl], out=dwu[e])
        dxe = dx_ND[sl]
        torch.mm(dhg_NF[sl], wg_EDF[e].t(), out=dxe)
        dxe.addmm_(dhu_NF[sl], wu_EDF[e].t())
        s += n
    return dx_ND, dwg, dwu, dwd


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Every GEMM kernel runs on a 1-D grid.  The row-tile kernels decode pid into (row tile, N
# block) with the N block varying fastest by default (N_FASTEST): the programs resident at once
# then share a few row tiles of x (re-read from L2, not HBM) instead of every program of a wave
# reading its own x tile once per N block (12x for x in gate/up at F=768, BLOCK_N=64 with the
# M-fastest order, whose working set exceeds L2).  `scripts/gpu_check.sh` times both orders.
# The weight-grad kernel keeps all tiles of one expert adjacent in the grid (its rows are read
# by every tile of dW[e] and stay in L2).  fp32 dots take PRECISION ("ieee" | "tf32x3" |
# "tf32"); 16-bit dots ignore it.
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _row_tile_pid(num_n, N_FASTEST: tl.constexpr):
        """pid -> (row tile, N block) of a 1-D grid of n_tiles * num_n programs."""
        pid = tl.program_id(0)
        if N_FASTEST:
            return pid // num_n, pid % num_n
        n_tiles = tl.num_programs(0) // num_n
        return pid % n_tiles, pid // n_tiles

    @triton.jit
    def _gate_up_fwd_kernel(
        x_ptr,
        wg_ptr,
        wu_ptr,
        hg_ptr,
        hu_ptr,
        a_ptr,
        tile_e_ptr,
        tile_r0_ptr,
        tile_r1_ptr,
        D,
        Fdim,
        stride_xn,
        stride_we,
        stride_wd,
        stride_hn,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        N_FASTEST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """hg = x@Wg[e], hu = x@Wu[e], a = silu(hg)*hu for BLOCK_M rows of one expert."""
        tile, pid_n = _row_tile_pid(tl.cdiv(Fdim, BLOCK_N), N_FASTEST)
        e = tl.load(tile_e_ptr + tile)
        r0 = tl.load(tile_r0_ptr + tile)
        r1 = tl.load(tile_r1_ptr + tile)
        if r0 < r1:
            rows = r0 + tl.arange(0, BLOCK_M)  # int64 (r0 is): no overflow at N*D >= 2**31
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < r1
            cmask = cols < Fdim
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            wbase = e.to(tl.int64) * stride_we
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < D
                xt = tl.load(
                    x_ptr + rows[:, None] * stride_xn + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :],
                    other=0.0,
                )
                woff = wbase + ks[:, None] * stride_wd + cols[None, :]
                wm = kmask[:, None] & cmask[None, :]
                gt = tl.load(wg_ptr + woff, mask=wm, other=0.0)
                ut = tl.load(wu_ptr + woff, mask=wm, other=0.0)
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                    gt = gt.to(tl.float32)
                    ut = ut.to(tl.float32)
                acc_g += tl.dot(xt, gt, input_precision=PRECISION)
                acc_u += tl.dot(xt, ut, input_precision=PRECISION)
            a = acc_g * tl.sigmoid(acc_g) * acc_u
            out_off = rows[:, None] * stride_hn + cols[None, :]
            om = rmask[:, None] & cmask[None, :]
            odt = hg_ptr.dtype.element_ty
            tl.store(hg_ptr + out_off, acc_g.to(odt), mask=om)
            tl.store(hu_ptr + out_off, acc_u.to(odt), mask=om)
            tl.store(a_ptr + out_off, a.to(odt), mask=om)

    @triton.jit
    def _gmm_kernel(
        x_ptr,
        w_ptr,
        x2_ptr,
        w2_ptr,
        y_ptr,
        hg_ptr,
        hu_ptr,
        y2_ptr,
        a_ptr,
        tile_e_ptr,
        tile_r0_ptr,
        tile_r1_ptr,
        K,
        M,
        stride_xn,
        stride_we,
        stride_wk,
        stride_wm,
        stride_yn,
        HAS_SECOND: tl.constexpr,
        SWIGLU_BWD: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        N_FASTEST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Y[rows of e] = X[rows] @ W[e] (+ X2[rows] @ W2[e]); W given by strides (so W^T works).

        SWIGLU_BWD epilogue (acc = dA): with hg, hu at the same positions, writes
        dhg -> y_ptr, dhu -> y2_ptr and the recomputed a = silu(hg)*hu -> a_ptr.
        """
        tile, pid_n = _row_tile_pid(tl.cdiv(M, BLOCK_N), N_FASTEST)
        e = tl.load(tile_e_ptr + tile)
        r0 = tl.load(tile_r0_ptr + tile)
        r1 = tl.load(tile_r1_ptr + tile)
        if r0 < r1:
            rows = r0 + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < r1
            cmask = cols < M
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            wbase = e.to(tl.int64) * stride_we
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < K
                xm = rmask[:, None] & kmask[None, :]
                wm = kmask[:, None] & cmask[None, :]
                xoff = rows[:, None] * stride_xn + ks[None, :]
                woff = wbase + ks[:, None] * stride_wk + cols[None, :] * stride_wm
                xt = tl.load(x_ptr + xoff, mask=xm, other=0.0)
                wt = tl.load(w_ptr + woff, mask=wm, other=0.0)
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc += tl.dot(xt, wt, input_precision=PRECISION)
                if HAS_SECOND:
                    x2 = tl.load(x2_ptr + xoff, mask=xm, other=0.0)
                    w2 = tl.load(w2_ptr + woff, mask=wm, other=0.0)
                    if DOT_FP32:
                        x2 = x2.to(tl.float32)
                        w2 = w2.to(tl.float32)
                    acc += tl.dot(x2, w2, input_precision=PRECISION)
            out_off = rows[:, None] * stride_yn + cols[None, :]
            om = rmask[:, None] & cmask[None, :]
            odt = y_ptr.dtype.element_ty
            if SWIGLU_BWD:
                hg = tl.load(hg_ptr + out_off, mask=om, other=0.0).to(tl.float32)
                hu = tl.load(hu_ptr + out_off, mask=om, other=0.0).to(tl.float32)
                sg = tl.sigmoid(hg)
                silu = hg * sg
                tl.store(a_ptr + out_off, (silu * hu).to(odt), mask=om)
                tl.store(y2_ptr + out_off, (acc * silu).to(odt), mask=om)
                dhg = acc * hu * sg * (1.0 + hg * (1.0 - sg))
                tl.store(y_ptr + out_off, dhg.to(odt), mask=om)
            else:
                tl.store(y_ptr + out_off, acc.to(odt), mask=om)

    @triton.jit
    def _gmm_wgrad_kernel(
        x_ptr,
        dy_ptr,
        dy2_ptr,
        dw_ptr,
        dw2_ptr,
        eid_ptr,
        off_ptr,
        cnt_ptr,
        K,
        M,
        stride_xn,
        stride_dyn,
        HAS_SECOND: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """dW[e] = X[rows of e]^T @ dY[rows of e]  (and dW2[e] with dY2, sharing X loads).

        1-D grid, expert-major: program p works on expert eid[p // tiles_per_expert], so an
        expert's tiles are adjacent.  Every element of dW[e] is written (zeros when e is empty).
        """
        num_k = tl.cdiv(K, BLOCK_K)
        num_n = tl.cdiv(M, BLOCK_N)
        pid = tl.program_id(0)
        e = tl.load(eid_ptr + pid // (num_k * num_n))
        rest = pid % (num_k * num_n)
        pid_k = rest // num_n
        pid_n = rest % num_n
        r0 = tl.load(off_ptr + e)
        n = tl.load(cnt_ptr + e)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        cmask = cols < M
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i0 in range(0, n, BLOCK_R):
            rr = r0 + i0 + tl.arange(0, BLOCK_R)  # int64 (r0 is)
            rmask = (i0 + tl.arange(0, BLOCK_R)) < n
            xt = tl.load(
                x_ptr + rr[None, :] * stride_xn + ks[:, None],
                mask=kmask[:, None] & rmask[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R] = X^T tile
            dm = rmask[:, None] & cmask[None, :]
            dyt = tl.load(dy_ptr + rr[:, None] * stride_dyn + cols[None, :], mask=dm, other=0.0)
            if DOT_FP32:
                xt = xt.to(tl.float32)
                dyt = dyt.to(tl.float32)
            acc += tl.dot(xt, dyt, input_precision=PRECISION)
            if HAS_SECOND:
                d2 = tl.load(dy2_ptr + rr[:, None] * stride_dyn + cols[None, :], mask=dm, other=0.0)
                if DOT_FP32:
                    d2 = d2.to(tl.float32)
                acc2 += tl.dot(xt, d2, input_precision=PRECISION)
        woff = e.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :]
        wm = kmask[:, None] & cmask[None, :]
        odt = dw_ptr.dtype.element_ty
        tl.store(dw_ptr + woff, acc.to(odt), mask=wm)
        if HAS_SECOND:
            tl.store(dw2_ptr + woff, acc2.to(odt), mask=wm)


N_FASTEST = True  # grid order of the row-tile kernels (see above); gpu_check times both

if HAS_TRITON:
    # one autotuner per (role, operand width) over the three kernels: each role has its own
    # register budget (epilogue, second product) and fp32 tiles need twice the storage
    _TUNED = {
        (r, w): triton.autotune(cfgs, key=["D", "Fdim"] if r == "gate_up" else ["K", "M"])(
            globals()[_ROLE_KERNEL[r]]
        )
        for (r, w), cfgs in _LAUNCH_CONFIGS.items()
    }


def _tuned(role: str, x: Tensor):
    return _TUNED[(role, "fp32" if x.dtype == torch.float32 else "bf16")]


def _schedule(counts_E: Tensor, N: int, block_m: int):
    """Device-side tile table: tile i -> (expert, first row, end row); no host sync.

    On CUDA the grid is the static upper bound ceil(N/BM)+E; tiles past the real count get
    r0 == r1 and exit immediately.
    """
    counts = counts_E.to(torch.int64)
    E = counts.shape[0]
    ends = torch.cumsum(counts, 0)
    offs = ends - counts
    tiles_e = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_e, 0)
    if counts.is_cuda:
        n_tiles = triton.cdiv(N, block_m) + E  # static bound: no host sync on the GPU path
    else:  # interpreter: a sync is free, and every empty program costs interpreter time
        n_tiles = int(tile_end[-1])
    tid = torch.arange(n_tiles, device=counts.device)
    te = torch.searchsorted(tile_end, tid, right=True).clamp_(max=E - 1)
    valid = tid < tile_end[-1]
    local = tid - (tile_end - tiles_e)[te]
    r0 = offs[te] + local * block_m
    r1 = torch.minimum(r0 + block_m, ends[te])
    r0 = torch.where(valid, r0, 0)
    r1 = torch.where(valid, r1, 0)
    return te.to(torch.int32), r0, r1, offs, counts, n_tiles


def _dot_fp32(x: Tensor) -> bool:
    # In the interpreter bf16/fp16 dots are garbage: upcast after loading.  On GPU, bf16 tiles
    # go to the tensor cores as they are and fp32 ones use PRECISION.
    return not x.is_cuda


def _check_counts(x_ND: Tensor, counts_E: Tensor) -> None:
    """The kernels trust the counts: a wrong device or dtype would read garbage, counts that do
    not sum to N would write out of bounds.  The sum check is an async device assert (a CUDA
    error at a later sync, no host sync here; raised at once on CPU)."""
    if counts_E.device != x_ND.device:
        raise ValueError(
            f"tokens_per_expert_E is on {counts_E.device} but x_sorted_ND is on {x_ND.device}; "
            "the Triton kernels read it on the device"
        )
    if counts_E.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens_per_expert_E must be int64 (or int32), got {counts_E.dtype}")
    if counts_E.numel():
        ok = (counts_E.sum() == x_ND.shape[0]) & (counts_E.min() >= 0)
        torch._assert_async(
            ok, "grouped_swiglu: tokens_per_expert_E must be >= 0 and sum to x_sorted_ND's rows"
        )


def _row_grid(n_tiles: int, cols: int):
    return lambda meta: (n_tiles * triton.cdiv(cols, meta["BLOCK_N"]),)


def _fwd_triton(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, precision="auto"):
    check_tile("BLOCK_M", _BLOCK_M)
    precision = resolve_precision(x_ND.dtype, precision)
    N, D = x_ND.shape
    E, _, Fdim = wg_EDF.shape
    _check_counts(x_ND, counts_E)
    x_ND = x_ND.contiguous()
    wg, wu, wd = wg_EDF.contiguous(), wu_EDF.contiguous(), wd_EFD.contiguous()
    hg = x_ND.new_empty(N, Fdim)
    hu = x_ND.new_empty(N, Fdim)
    a = x_ND.new_empty(N, Fdim)
    y = x_ND.new_empty(N, D)
    if N == 0:
        return y, hg, hu
    te, r0, r1, _, _, n_tiles = _schedule(counts_E, N, _BLOCK_M)
    opts = dict(DOT_FP32=_dot_fp32(x_ND), PRECISION=precision, N_FASTEST=N_FASTEST)
    _tuned("gate_up", x_ND)[_row_grid(n_tiles, Fdim)](
        x_ND, wg, wu, hg, hu, a, te, r0, r1, D, Fdim,
        x_ND.stride(0), wg.stride(0), wg.stride(1), hg.stride(0),
        BLOCK_M=_BLOCK_M, **opts,
    )  # fmt: skip
    _tuned("down", x_ND)[_row_grid(n_tiles, D)](
        a, wd, a, wd, y, y, y, y, y, te, r0, r1, Fdim, D,
        a.stride(0), wd.stride(0), wd.stride(1), wd.stride(2), y.stride(0),
        HAS_SECOND=False, SWIGLU_BWD=False, BLOCK_M=_BLOCK_M, **opts,
    )  # fmt: skip
    return y, hg, hu


def _wgrad_grid(n_e: int, K: int, M: int):
    return lambda meta: (n_e * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(M, meta["BLOCK_N"]),)


def _bwd_triton(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF, precision="auto"):
    check_tile("BLOCK_M", _BLOCK_M)
    precision = resolve_precision(x_ND.dtype, precision)
    N, D = x_ND.shape
    E, _, Fdim = wg_EDF.shape
    x_ND = x_ND.contiguous()
    dy_ND = dy_ND.contiguous()
    wg, wu, wd = wg_EDF.contiguous(), wu_EDF.contiguous(), wd_EFD.contiguous()
    # every element of the weight grads is written by the kernel (zeros for an empty expert), so
    # no memset: zero-filling them cost ~680 MB of writes at the Sigma-MoE-Tiny layer shape
    dwg = torch.empty_like(wg)
    dwu = torch.empty_like(wu)
    dwd = torch.empty_like(wd)
    dx = torch.empty_like(x_ND)
    if N == 0:
        for w in (dwg, dwu, dwd):
            w.zero_()
        return dx, dwg, dwu, dwd
    te, r0, r1, offs, counts, n_tiles = _schedule(counts_E, N, _BLOCK_M)
    if x_ND.is_cuda:  # every expert (no sync): empty experts' programs store zeros
        eids = torch.arange(E, device=x_ND.device)
    else:  # interpreter: only non-empty experts run (each program costs CPU time) ...
        eids = counts.nonzero().flatten()
        empty = (counts == 0).nonzero().flatten()
        for w in (dwg, dwu, dwd):  # ... and the empty experts' slices are zeroed here
            w.index_fill_(0, empty, 0)
    n_e = eids.numel()
    opts = dict(DOT_FP32=_dot_fp32(x_ND), PRECISION=precision)
    row_opts = dict(BLOCK_M=_BLOCK_M, N_FASTEST=N_FASTEST, **opts)
    dhg = torch.empty_like(hg_NF)
    dhu = torch.empty_like(hg_NF)
    a = torch.empty_like(hg_NF)
    # dA = dY @ Wd[e]^T (Wd^T via strides) with the SwiGLU backward epilogue
    _tuned("dA", x_ND)[_row_grid(n_tiles, Fdim)](
        dy_ND, wd, dy_ND, wd, dhg, hg_NF, hu_NF, dhu, a, te, r0, r1, D, Fdim,
        dy_ND.stride(0), wd.stride(0), wd.stride(2), wd.stride(1), dhg.stride(0),
        HAS_SECOND=False, SWIGLU_BWD=True, **row_opts,
    )  # fmt: skip
    # dX = dHg @ Wg[e]^T + dHu @ Wu[e]^T
    _tuned("dX", x_ND)[_row_grid(n_tiles, D)](
        dhg, wg, dhu, wu, dx, dx, dx, dx, dx, te, r0, r1, Fdim, D,
        dhg.stride(0), wg.stride(0), wg.stride(2), wg.stride(1), dx.stride(0),
        HAS_SECOND=True, SWIGLU_BWD=False, **row_opts,
    )  # fmt: skip
    # dWg[e] = X^T dHg, dWu[e] = X^T dHu (shared X loads);  dWd[e] = A^T dY
    _tuned("dW2", x_ND)[_wgrad_grid(n_e, D, Fdim)](
        x_ND, dhg, dhu, dwg, dwu, eids, offs, counts, D, Fdim, x_ND.stride(0), dhg.stride(0),
        HAS_SECOND=True, **opts,
    )  # fmt: skip
    _tuned("dW1", x_ND)[_wgrad_grid(n_e, Fdim, D)](
        a, dy_ND, dy_ND, dwd, dwd, eids, offs, counts, Fdim, D, a.stride(0), dy_ND.stride(0),
        HAS_SECOND=False, **opts,
    )  # fmt: skip
    return dx, dwg, dwu, dwd


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sigma_moe::grouped_swiglu_fwd", mutates_args=())
def _gs_fwd_op(
    x_ND: Tensor,
    counts_E: Tensor,
    wg_EDF: Tensor,
    wu_EDF: Tensor,
    wd_EFD: Tensor,
    backend: str,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y_ND, h_gate_NF, h_up_NF); the h_* are saved for backward."""
    if backend == "torch":
        return _fwd_torch_best(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)
    return _fwd_triton(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, precision)


@_gs_fwd_op.register_fake
def _(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, backend, precision):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    return x_ND.new_empty(N, D), x_ND.new_empty(N, Fdim), x_ND.new_empty(N, Fdim)


@torch.library.custom_op("sigma_moe::grouped_swiglu_bwd", mutates_args=())
def _gs_bwd_op(
    dy_ND: Tensor,
    x_ND: Tensor,
    counts_E: Tensor,
    wg_EDF: Tensor,
    wu_EDF: Tensor,
    wd_EFD: Tensor,
    hg_NF: Tensor,
    hu_NF: Tensor,
    backend: str,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF)
    if backend == "torch":
        return _bwd_torch_best(*args)
    return _bwd_triton(*args, precision)


@_gs_bwd_op.register_fake
def _(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF, backend, precision):
    return (
        torch.empty_like(x_ND),
        torch.empty_like(wg_EDF),
        torch.empty_like(wu_EDF),
        torch.empty_like(wd_EFD),
    )


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    x_ND, counts_E, wg, wu, wd, backend, precision = inputs
    _, hg, hu = output
    ctx.save_for_backward(x_ND, counts_E, wg, wu, wd, hg, hu)
    ctx.backend = backend
    ctx.precision = precision


def _backward(ctx, dy_ND, _ghg, _ghu):
    x_ND, counts_E, wg, wu, wd, hg, hu = ctx.saved_tensors
    if dy_ND is None:
        return None, None, None, None, None, None, None
    dx, dwg, dwu, dwd = _gs_bwd_op(
        dy_ND.contiguous(), x_ND, counts_E, wg, wu, wd, hg, hu, ctx.backend, ctx.precision
    )
    return dx, None, dwg, dwu, dwd, None, None


torch.library.register_autograd("sigma_moe::grouped_swiglu_fwd", _backward, setup_context=_setup)


def grouped_swiglu(
    x_sorted_ND: Tensor,
    tokens_per_expert_E: Tensor,
    w_gate_EDF: Tensor,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    *,
    backend: str = "auto",
    input_precision: str | None = None,
) -> Tensor:
    """Per-expert SwiGLU over expert-sorted rows; see the module docstring.

    ``input_precision`` (Triton backends, fp32 only): "ieee" | "tf32x3" (fp32 accuracy) |
    "tf32" (fast, ~1e-3 relative error); None follows ``torch.get_float32_matmul_precision()``
    (see ``resolve_precision``).
    """
    _check_args(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)
    be = resolve_backend(backend, x_sorted_ND, w_gate_EDF, w_up_EDF, w_down_EFD)
    prec = check_precision(input_precision)  # "auto" is resolved by the launcher
    outs = _gs_fwd_op(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD, be, prec)
    return outs[0]
