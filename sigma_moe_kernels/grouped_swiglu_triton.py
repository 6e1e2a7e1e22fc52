"""grouped_swiglu, Triton implementation (backends ``triton`` / ``interpret``): grouped GEMM
kernels driven by a device-side tile schedule (no host sync).  The op, its checks and autograd
live in ``grouped_swiglu.py``; tile configs per GEMM role in ``_gemm_tiles.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, check_tile

# tile configs per GEMM role (BLOCK_M, the autotune sets) and the fp32 dot precision
from ._gemm_tiles import _BLOCK_M, _LAUNCH_CONFIGS, _ROLE_KERNEL, resolve_precision

if HAS_TRITON:
    import triton
    import triton.language as tl


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
