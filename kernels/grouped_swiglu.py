"""Grouped SwiGLU experts over expert-sorted rows (op family ``grouped_swiglu``).

``grouped_swiglu(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)`` -> ``y_ND``
where, for expert e owning rows ``[off_e, off_e + n_e)`` (``off`` = exclusive cumsum of
``tokens_per_expert_E``): ``y = (silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e]``.  Experts with zero
tokens are legal (their weight gradients are zero).  Gradients: x and all three weights.

Saved for backward: the two pre-activations ``h_gate_NF`` and ``h_up_NF`` (2*N*F elements,
i.e. 2*F/D of one activation row); ``silu(h_gate)*h_up`` is recomputed in backward (one cheap
elementwise pass) instead of being saved, which keeps the layer's peak memory near a dense FFN.

Backends
* torch: one host sync (``tokens_per_expert.tolist()``), then per-expert ``torch.mm`` into
  slices of preallocated outputs (``out=``), with the SwiGLU elementwise work done once over all
  N rows.  See ``_fwd_torch`` / ``_bwd_torch`` for the measured alternatives.
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
# F=256 E=96 top-1 fp32, random routing: max expert load 63 rows, mean 43; numbers are minima of
# repeated runs; full tables in docs/benchmarks/2026-11-23-cpu.md):
#   * one torch.mm per expert (the obvious loop, "_loop" functions below; 9 GEMM calls per
#     expert per step = 864 calls) costs ~4x the dense GEMM of the same FLOPs for the forward
#     projections alone (97 ms vs 24 ms): each small call pays an OpenMP fork/join plus packing of
#     a 512 KB weight panel for only ~43 rows, and the fork/joins are what suffers most when the
#     two cores are shared.
#   * one torch.bmm over [E, C, D] buffers padded to the largest expert runs at ~dense per-row
#     speed (38 ms for 96*63 padded rows vs 24 ms dense for 4096) but wastes the padding
#     (x1.48 rows here, and up to x E when one expert takes every token).
#   * kept: "ranged bmm".  Experts are split into contiguous index ranges [e0, e1) (so the
#     weights of a range are a view, never copied); each range is padded only to its own largest
#     expert and run as one bmm per GEMM.  The split minimises
#         sum over ranges (ALPHA + (e1 - e0) * max count in range)
#     (ALPHA = the cost of one extra call, in rows) by an O(E^2) dynamic programme done in numpy
#     on the host counts (the single host sync). Everything stays in the padded layout between
#     the GEMMs (padded rows are zero, so they contribute nothing to the weight gradients); x and
#     dy are scattered into it once and y / dx gathered out once.
# ----------------------------------------------------------------------------------------------
_ALPHA_ROWS = 48  # one more bmm range ~ 48 padded rows of work (see the benchmark docs)


def _plan(counts: list[int], alpha: int = _ALPHA_ROWS):
    """Split experts into contiguous ranges; returns [(e0, e1, cap, row0_in_padded)], P."""
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


def _pad_index(counts: list[int], plan, device) -> Tensor:
    """dest_N[r] = row of sorted row r in the padded buffer."""
    cap_e, base_e = [], []
    for e0, e1, cap, p0 in plan:
        for j in range(e1 - e0):
            cap_e.append(cap)
            base_e.append(p0 + j * cap)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    offs = torch.cumsum(counts_t, 0) - counts_t
    N = int(counts_t.sum())
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts_t, output_size=N)
    dest = torch.tensor(base_e, dtype=torch.int64)[expert_of_row] + (
        torch.arange(N) - offs[expert_of_row]
    )
    return dest.to(device)


def _to_padded(t_ND: Tensor, dest_N: Tensor, P: int) -> Tensor:
    out = t_ND.new_zeros(P, t_ND.shape[1])
    out.index_copy_(0, dest_N, t_ND)
    return out


def _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    counts = _counts_list(counts_E, N)
    plan, P = _plan(counts)
    dest = _pad_index(counts, plan, x_ND.device)
    xp = _to_padded(x_ND, dest, P)
    hg = x_ND.new_empty(P, Fdim)
    hu = x_ND.new_empty(P, Fdim)
    yp = x_ND.new_empty(P, D)
    for e0, e1, cap, p0 in plan:
        if cap == 0:
            continue
        n = e1 - e0
        sl = slice(p0, p0 + n * cap)
        xr = xp[sl].view(n, cap, D)
        torch.bmm(xr, wg_EDF[e0:e1], out=hg[sl].view(n, cap, Fdim))
        torch.bmm(xr, wu_EDF[e0:e1], out=hu[sl].view(n, cap, Fdim))
    a = F.silu(hg).mul_(hu)
    for e0, e1, cap, p0 in plan:
        if cap == 0:
            continue
        n = e1 - e0
        sl = slice(p0, p0 + n * cap)
        torch.bmm(a[sl].view(n, cap, Fdim), wd_EFD[e0:e1], out=yp[sl].view(n, cap, D))
    return yp.index_select(0, dest), xp, hg, hu, dest


def _bwd_torch(dy_ND, xp, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu, dest):
    N, D = dy_ND.shape
    P, Fdim = hg.shape
    counts = _counts_list(counts_E, N)
    plan, P2 = _plan(counts)
    assert P2 == P
    dyp = _to_padded(dy_ND, dest, P)
    dA = torch.empty_like(hg)
    for e0, e1, cap, p0 in plan:
        if cap == 0:
            continue
        n = e1 - e0
        sl = slice(p0, p0 + n * cap)
        torch.bmm(
            dyp[sl].view(n, cap, D), wd_EFD[e0:e1].transpose(1, 2), out=dA[sl].view(n, cap, Fdim)
        )
    # SwiGLU backward over all rows at once (fp32 math for low-precision inputs)
    acc = torch.promote_types(hg.dtype, torch.float32)
    hg32, hu32, dA32 = hg.to(acc), hu.to(acc), dA.to(acc)
    sg = torch.sigmoid(hg32)
    silu = hg32 * sg
    a = (silu * hu32).to(hg.dtype)
    dhu = (dA32 * silu).to(hg.dtype)
    # d silu/dh = sg * (1 + h * (1 - sg)); hg32/dA32 are temporaries when the input is bf16 and
    # the saved tensors are not used after this, so in-place is safe either way.
    dhg = (dA32.mul_(hu32).mul_(sg).mul_((hg32 * (1.0 - sg)).add_(1.0))).to(hg.dtype)
    del hg32, hu32, dA32, sg, silu, dA
    dwg = torch.empty_like(wg_EDF)
    dwu = torch.empty_like(wu_EDF)
    dwd = torch.empty_like(wd_EFD)
    dxp = torch.empty(P, D, dtype=xp.dtype, device=xp.device)
    for e0, e1, cap, p0 in plan:
        n = e1 - e0
        if cap == 0:
            dwg[e0:e1].zero_()
            dwu[e0:e1].zero_()
            dwd[e0:e1].zero_()
            continue
        sl = slice(p0, p0 + n * cap)
        xr = xp[sl].view(n, cap, D)
        dhg_r = dhg[sl].view(n, cap, Fdim)
        dhu_r = dhu[sl].view(n, cap, Fdim)
        torch.bmm(a[sl].view(n, cap, Fdim).transpose(1, 2), dyp[sl].view(n, cap, D), out=dwd[e0:e1])
        torch.bmm(xr.transpose(1, 2), dhg_r, out=dwg[e0:e1])
        torch.bmm(xr.transpose(1, 2), dhu_r, out=dwu[e0:e1])
        dxr = dxp[sl].view(n, cap, D)
        torch.bmm(dhg_r, wg_EDF[e0:e1].transpose(1, 2), out=dxr)
        dxr.baddbmm_(dhu_r, wu_EDF[e0:e1].transpose(1, 2))
    return dxp.index_select(0, dest), dwg, dwu, dwd


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
    acc = torch.promote_types(hg_NF.dtype, torch.float32)
    hg, hu, dA = hg_NF.to(acc), hu_NF.to(acc), dA_NF.to(acc)
    sg = torch.sigmoid(hg)
    silu = hg * sg
    a_NF = (silu * hu).to(x_ND.dtype)
    dhu_NF = (dA * silu).to(x_ND.dtype)
    dhg_NF = (dA * hu * sg * (1.0 + hg * (1.0 - sg))).to(x_ND.dtype)
    dwg = torch.empty_like(wg_EDF)
    dwu = torch.empty_like(wu_EDF)
    dwd = torch.empty_like(wd_EFD)
    dx_ND = torch.empty_like(x_ND)
    s = 0
    for e, n in enumerate(counts):
        if n == 0:
            dwg[e].zero_()
            dwu[e].zero_()
            dwd[e].zero_()
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
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """hg = x@Wg[e], hu = x@Wu[e], a = silu(hg)*hu for BLOCK_M rows of one expert."""
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_e_ptr + tile)
        r0 = tl.load(tile_r0_ptr + tile)
        r1 = tl.load(tile_r1_ptr + tile)
        if r0 < r1:
            rows = r0 + tl.arange(0, BLOCK_M)
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
                acc_g += tl.dot(xt, gt)
                acc_u += tl.dot(xt, ut)
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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Y[rows of e] = X[rows] @ W[e] (+ X2[rows] @ W2[e]); W given by strides (so W^T works).

        SWIGLU_BWD epilogue (acc = dA): with hg, hu at the same positions, writes
        dhg -> y_ptr, dhu -> y2_ptr and the recomputed a = silu(hg)*hu -> a_ptr.
        """
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
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
                acc += tl.dot(xt, wt)
                if HAS_SECOND:
                    x2 = tl.load(x2_ptr + xoff, mask=xm, other=0.0)
                    w2 = tl.load(w2_ptr + woff, mask=wm, other=0.0)
                    if DOT_FP32:
                        x2 = x2.to(tl.float32)
                        w2 = w2.to(tl.float32)
                    acc += tl.dot(x2, w2)
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
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """dW[e] = X[rows of e]^T @ dY[rows of e]  (and dW2[e] with dY2, sharing X loads)."""
        e = tl.load(eid_ptr + tl.program_id(0))
        pid_k = tl.program_id(1)
        pid_n = tl.program_id(2)
        r0 = tl.load(off_ptr + e)
        n = tl.load(cnt_ptr + e)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        cmask = cols < M
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i0 in range(0, n, BLOCK_R):
            rr = r0 + i0 + tl.arange(0, BLOCK_R)
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
            acc += tl.dot(xt, dyt)
            if HAS_SECOND:
                d2 = tl.load(dy2_ptr + rr[:, None] * stride_dyn + cols[None, :], mask=dm, other=0.0)
                if DOT_FP32:
                    d2 = d2.to(tl.float32)
                acc2 += tl.dot(xt, d2)
        woff = e.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :]
        wm = kmask[:, None] & cmask[None, :]
        odt = dw_ptr.dtype.element_ty
        tl.store(dw_ptr + woff, acc.to(odt), mask=wm)
        if HAS_SECOND:
            tl.store(dw2_ptr + woff, acc2.to(odt), mask=wm)


# Tile sizes.  GPU: 64x64x32 tiles (bf16 operands, fp32 accumulators) are a conservative
# first-run choice for H100; the interpreter uses the same kernels with the same tiles.  Every
# tl.dot dimension is asserted to be a power of two >= 16.
_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32
_BLOCK_R = 32  # rows per step of the weight-grad reduction (a dot dimension too)


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
    # In the interpreter bf16/fp16 dots are garbage: upcast after loading. On GPU, fp32
    # tiles use tf32 tensor cores and bf16 tiles go to the tensor cores as they are.
    return not x.is_cuda


def _fwd_triton(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    for name, v in (("BLOCK_M", _BLOCK_M), ("BLOCK_N", _BLOCK_N), ("BLOCK_K", _BLOCK_K)):
        check_tile(name, v)
    N, D = x_ND.shape
    E, _, Fdim = wg_EDF.shape
    x_ND = x_ND.contiguous()
    wg, wu, wd = wg_EDF.contiguous(), wu_EDF.contiguous(), wd_EFD.contiguous()
    hg = x_ND.new_empty(N, Fdim)
    hu = x_ND.new_empty(N, Fdim)
    a = x_ND.new_empty(N, Fdim)
    y = x_ND.new_empty(N, D)
    if N == 0:
        return y, hg, hu
    te, r0, r1, _, _, n_tiles = _schedule(counts_E, N, _BLOCK_M)
    dot32 = _dot_fp32(x_ND)
    _gate_up_fwd_kernel[(n_tiles, triton.cdiv(Fdim, _BLOCK_N))](
        x_ND, wg, wu, hg, hu, a, te, r0, r1, D, Fdim,
        x_ND.stride(0), wg.stride(0), wg.stride(1), hg.stride(0),
        DOT_FP32=dot32, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    _gmm_kernel[(n_tiles, triton.cdiv(D, _BLOCK_N))](
        a, wd, a, wd, y, y, y, y, y, te, r0, r1, Fdim, D,
        a.stride(0), wd.stride(0), wd.stride(1), wd.stride(2), y.stride(0),
        HAS_SECOND=False, SWIGLU_BWD=False, DOT_FP32=dot32,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    return y, hg, hu


def _bwd_triton(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF):
    for name, v in (
        ("BLOCK_M", _BLOCK_M),
        ("BLOCK_N", _BLOCK_N),
        ("BLOCK_K", _BLOCK_K),
        ("BLOCK_R", _BLOCK_R),
    ):
        check_tile(name, v)
    N, D = x_ND.shape
    E, _, Fdim = wg_EDF.shape
    x_ND = x_ND.contiguous()
    dy_ND = dy_ND.contiguous()
    wg, wu, wd = wg_EDF.contiguous(), wu_EDF.contiguous(), wd_EFD.contiguous()
    dwg = torch.zeros_like(wg)
    dwu = torch.zeros_like(wu)
    dwd = torch.zeros_like(wd)
    dx = torch.empty_like(x_ND)
    if N == 0:
        return dx, dwg, dwu, dwd
    te, r0, r1, offs, counts, n_tiles = _schedule(counts_E, N, _BLOCK_M)
    # weight-grad programs: every expert on CUDA (no sync; empty ones store zeros), only the
    # non-empty ones in the interpreter (dW starts at zero)
    eids = torch.arange(E, device=x_ND.device) if x_ND.is_cuda else counts.nonzero().flatten()
    n_e = E if x_ND.is_cuda else eids.numel()
    dot32 = _dot_fp32(x_ND)
    dhg = torch.empty_like(hg_NF)
    dhu = torch.empty_like(hg_NF)
    a = torch.empty_like(hg_NF)
    # dA = dY @ Wd[e]^T (Wd^T via strides) with the SwiGLU backward epilogue
    _gmm_kernel[(n_tiles, triton.cdiv(Fdim, _BLOCK_N))](
        dy_ND, wd, dy_ND, wd, dhg, hg_NF, hu_NF, dhu, a, te, r0, r1, D, Fdim,
        dy_ND.stride(0), wd.stride(0), wd.stride(2), wd.stride(1), dhg.stride(0),
        HAS_SECOND=False, SWIGLU_BWD=True, DOT_FP32=dot32,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    # dX = dHg @ Wg[e]^T + dHu @ Wu[e]^T
    _gmm_kernel[(n_tiles, triton.cdiv(D, _BLOCK_N))](
        dhg, wg, dhu, wu, dx, dx, dx, dx, dx, te, r0, r1, Fdim, D,
        dhg.stride(0), wg.stride(0), wg.stride(2), wg.stride(1), dx.stride(0),
        HAS_SECOND=True, SWIGLU_BWD=False, DOT_FP32=dot32,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    # dWg[e] = X^T dHg, dWu[e] = X^T dHu (shared X loads);  dWd[e] = A^T dY
    _gmm_wgrad_kernel[(n_e, triton.cdiv(D, _BLOCK_K), triton.cdiv(Fdim, _BLOCK_N))](
        x_ND, dhg, dhu, dwg, dwu, eids, offs, counts, D, Fdim, x_ND.stride(0), dhg.stride(0),
        HAS_SECOND=True, DOT_FP32=dot32,
        BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, BLOCK_R=_BLOCK_R,
    )  # fmt: skip
    _gmm_wgrad_kernel[(n_e, triton.cdiv(Fdim, _BLOCK_K), triton.cdiv(D, _BLOCK_N))](
        a, dy_ND, dy_ND, dwd, dwd, eids, offs, counts, Fdim, D, a.stride(0), dy_ND.stride(0),
        HAS_SECOND=False, DOT_FP32=dot32,
        BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, BLOCK_R=_BLOCK_R,
    )  # fmt: skip
    return dx, dwg, dwu, dwd


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sigma_moe::grouped_swiglu_fwd", mutates_args=())
def _gs_fwd_op(
    x_ND: Tensor, counts_E: Tensor, wg_EDF: Tensor, wu_EDF: Tensor, wd_EFD: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y_ND, x_saved, h_gate, h_up, dest).

    torch backend: x_saved / h_* are in the padded ranged layout (P rows) and dest_N maps sorted
    rows to padded rows.  Triton backends: x_saved and dest are empty (x itself is saved; an op
    output may not alias an input) and h_* have N rows.
    """
    if backend == "torch":
        return _fwd_torch(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)
    y, hg, hu = _fwd_triton(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD)
    empty = x_ND.new_empty(0)
    return y, empty, hg, hu, counts_E.new_empty(0, dtype=torch.int64)


@_gs_fwd_op.register_fake
def _(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, backend):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    if backend == "torch":
        # padded row count is data dependent
        P = torch.library.get_ctx().new_dynamic_size()
        return (
            x_ND.new_empty(N, D),
            x_ND.new_empty(P, D),
            x_ND.new_empty(P, Fdim),
            x_ND.new_empty(P, Fdim),
            x_ND.new_empty(N, dtype=torch.int64),
        )
    return (
        x_ND.new_empty(N, D),
        x_ND.new_empty(0),
        x_ND.new_empty(N, Fdim),
        x_ND.new_empty(N, Fdim),
        x_ND.new_empty(0, dtype=torch.int64),
    )


@torch.library.custom_op("sigma_moe::grouped_swiglu_bwd", mutates_args=())
def _gs_bwd_op(
    dy_ND: Tensor,
    x_saved: Tensor,
    counts_E: Tensor,
    wg_EDF: Tensor,
    wu_EDF: Tensor,
    wd_EFD: Tensor,
    hg: Tensor,
    hu: Tensor,
    dest: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _bwd_torch(dy_ND, x_saved, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu, dest)
    return _bwd_triton(dy_ND, x_saved, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu)


@_gs_bwd_op.register_fake
def _(dy_ND, x_saved, counts_E, wg_EDF, wu_EDF, wd_EFD, hg, hu, dest, backend):
    return (
        torch.empty_like(dy_ND),
        torch.empty_like(wg_EDF),
        torch.empty_like(wu_EDF),
        torch.empty_like(wd_EFD),
    )


def _setup(ctx, inputs, output):
    x_ND, counts_E, wg, wu, wd, backend = inputs
    _, xp, hg, hu, dest = output
    x_saved = xp if backend == "torch" else x_ND
    ctx.save_for_backward(x_saved, counts_E, wg, wu, wd, hg, hu, dest)
    ctx.backend = backend


def _backward(ctx, dy_ND, *_unused):
    x_saved, counts_E, wg, wu, wd, hg, hu, dest = ctx.saved_tensors
    dx, dwg, dwu, dwd = _gs_bwd_op(
        dy_ND.contiguous(), x_saved, counts_E, wg, wu, wd, hg, hu, dest, ctx.backend
    )
    return dx, None, dwg, dwu, dwd, None


torch.library.register_autograd("sigma_moe::grouped_swiglu_fwd", _backward, setup_context=_setup)


def grouped_swiglu(
    x_sorted_ND: Tensor,
    tokens_per_expert_E: Tensor,
    w_gate_EDF: Tensor,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Per-expert SwiGLU over expert-sorted rows; see the module docstring."""
    _check_args(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)
    be = resolve_backend(backend, x_sorted_ND, w_gate_EDF, w_up_EDF, w_down_EFD)
    outs = _gs_fwd_op(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD, be)
    return outs[0]
