"""Token permutation by expert and the weighted combine back (op family ``permute``).

``permute(x_TD, experts_TK)`` -> ``(x_sorted_ND, row_map_N)`` with N = T*k:

* ``x_sorted_ND`` holds one row per (token, slot) pair, grouped by expert in ascending expert
  order and, within an expert, in ascending ``t*k + slot`` order (stable);
* ``row_map_N`` (int64, length N) is indexed by the flattened pair ``i = t*k + slot`` and gives
  that pair's row in ``x_sorted_ND``: ``x_sorted_ND[row_map_N[t*k + j]] == x_TD[t]``.  It is a
  permutation of ``0..N-1``.

``unpermute(y_ND, row_map_N, weights_TK)`` -> ``y_TD[t] = sum_j weights_TK[t, j] *
y_ND[row_map_N[t*k + j]]`` (computed in float32, returned in ``y_ND.dtype``).

Gradients flow to ``x_TD``, ``y_ND`` and ``weights_TK``.  All backends use torch's stable
``argsort`` of the N expert ids for the ordering (a GPU radix sort; ScatterMoE does the same);
the Triton kernels do the data movement: a blocked row gather, a blocked weighted k-way combine
(also the backward of ``permute`` with unit weights) and a blocked scatter + row-dot (backward
of ``unpermute``).  Every gather/scatter index is a permutation, so no atomics are needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, check_block, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["permute", "unpermute", "permute_reference", "unpermute_reference"]


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def permute_reference(x_TD: Tensor, experts_TK: Tensor):
    """Naive reference: python loop over experts in ascending order."""
    _check_permute(x_TD, experts_TK)
    T, k = experts_TK.shape
    flat = experts_TK.reshape(-1)
    row_map = torch.empty(T * k, dtype=torch.int64, device=x_TD.device)
    chunks, r = [], 0
    for e in torch.unique(flat).tolist():  # ascending experts
        pairs = (flat == e).nonzero().flatten()  # ascending t*k+slot: stable
        chunks.append(x_TD[torch.div(pairs, k, rounding_mode="floor")])
        row_map[pairs] = torch.arange(r, r + pairs.numel(), device=x_TD.device)
        r += pairs.numel()
    x_sorted = torch.cat(chunks) if chunks else x_TD.new_empty(0, x_TD.shape[1])
    return x_sorted, row_map


def unpermute_reference(y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor):
    _check_unpermute(y_ND, row_map_N, weights_TK)
    T, k = weights_TK.shape
    acc = _acc_dtype(y_ND.dtype)
    y_TKD = y_ND[row_map_N].reshape(T, k, -1).to(acc)
    return (weights_TK.to(acc).unsqueeze(-1) * y_TKD).sum(1).to(y_ND.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs, the input dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _check_permute(x_TD: Tensor, experts_TK: Tensor) -> None:
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2:
        raise ValueError(f"x_TD must be a 2-D tensor [tokens, hidden], got {_shape(x_TD)}")
    if not isinstance(experts_TK, Tensor) or experts_TK.dim() != 2:
        raise ValueError(f"experts_TK must be a 2-D tensor [tokens, k], got {_shape(experts_TK)}")
    if experts_TK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"experts_TK must be int64 (or int32), got {experts_TK.dtype}")
    if experts_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"experts_TK has {experts_TK.shape[0]} rows but x_TD has {x_TD.shape[0]} tokens"
        )
    if experts_TK.device != x_TD.device:
        raise ValueError("experts_TK and x_TD must be on the same device")


def _check_unpermute(y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor) -> None:
    if not isinstance(y_ND, Tensor) or y_ND.dim() != 2:
        raise ValueError(f"y_ND must be a 2-D tensor [tokens*k, hidden], got {_shape(y_ND)}")
    if not isinstance(weights_TK, Tensor) or weights_TK.dim() != 2:
        raise ValueError(f"weights_TK must be a 2-D tensor [tokens, k], got {_shape(weights_TK)}")
    if not weights_TK.is_floating_point():
        raise ValueError(f"weights_TK must be floating point, got {weights_TK.dtype}")
    if not isinstance(row_map_N, Tensor) or row_map_N.dim() != 1:
        raise ValueError(f"row_map must be a 1-D int64 tensor, got {_shape(row_map_N)}")
    if row_map_N.dtype != torch.int64:
        raise ValueError(f"row_map must be int64, got {row_map_N.dtype}")
    N = weights_TK.shape[0] * weights_TK.shape[1]
    if row_map_N.shape[0] != N or y_ND.shape[0] != N:
        raise ValueError(
            f"row_map ({row_map_N.shape[0]}) and y_ND ({y_ND.shape[0]} rows) must both have "
            f"T*k = {N} entries for weights_TK of shape {tuple(weights_TK.shape)}"
        )
    if not (y_ND.device == row_map_N.device == weights_TK.device):
        raise ValueError("y_ND, row_map and weights_TK must be on the same device")


def _shape(t):
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------
def _sort_order(experts_TK: Tensor) -> Tensor:
    """order_N[r] = flattened pair index placed at sorted row r (stable by t*k+slot)."""
    return torch.argsort(experts_TK.reshape(-1), stable=True)


def _row_map_from_order(order_N: Tensor) -> Tensor:
    row_map_N = torch.empty_like(order_N)
    row_map_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return row_map_N


def _source_rows(experts_TK: Tensor) -> tuple[Tensor, Tensor]:
    """(src_N, row_map_N): sorted row r holds x_TD[src_N[r]]; row_map as ``permute`` returns
    it. Every backend's permute and ``sort_rows`` use this one ordering."""
    k = experts_TK.shape[1]
    order_N = _sort_order(experts_TK)
    src_N = order_N if k == 1 else torch.div(order_N, k, rounding_mode="floor")
    return src_N, _row_map_from_order(order_N)


def _permute_fwd_torch(x_TD: Tensor, experts_TK: Tensor):
    src_N, row_map_N = _source_rows(experts_TK)
    return x_TD.index_select(0, src_N), row_map_N


def _combine_torch(y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor | None, T: int, k: int):
    """out_TD[t] = sum_j w[t, j] * y_ND[row_map[t*k+j]] (w = 1 when None)."""
    y_NpD = y_ND.index_select(0, row_map_N)  # pair order
    D = y_ND.shape[1]
    if weights_TK is None:
        if k == 1:
            return y_NpD
        return y_NpD.view(T, k, D).sum(1)
    if y_ND.dtype == torch.float32 and weights_TK.dtype == torch.float32:
        if k == 1:
            return y_NpD.mul_(weights_TK)
        # bmm [T,1,k] @ [T,k,D]: one fused multiply-add pass, no [T,k,D] temporary
        return torch.bmm(weights_TK.unsqueeze(1), y_NpD.view(T, k, D)).view(T, D)
    acc = _acc_dtype(y_ND.dtype)
    out = (weights_TK.to(acc).unsqueeze(-1) * y_NpD.view(T, k, D).to(acc)).sum(1)
    return out.to(y_ND.dtype)


def _unpermute_bwd_torch(grad_TD: Tensor, y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor):
    """grad_y[row_map[t*k+j]] = w[t,j] * g[t];  grad_w[t,j] = <g[t], y[row_map[t*k+j]]>.

    Memory-lean (measured: the naive version held three extra N x D temporaries at the start of
    the MoE backward, +24 MB at T=4096, D=512): grad_y is gathered straight in sorted order
    through the inverse permutation and scaled in place; grad_w gathers y in chunks.
    """
    T, k = weights_TK.shape
    N, D = y_ND.shape
    acc = _acc_dtype(y_ND.dtype)
    order_N = torch.empty_like(row_map_N)
    order_N[row_map_N] = torch.arange(N, device=row_map_N.device)  # sorted row -> pair
    src_N = order_N if k == 1 else torch.div(order_N, k, rounding_mode="floor")
    w_sorted = weights_TK.reshape(-1).index_select(0, order_N).to(acc).unsqueeze(1)
    if grad_TD.dtype == y_ND.dtype and acc == y_ND.dtype:
        grad_y_ND = grad_TD.index_select(0, src_N).mul_(w_sorted)
    else:
        grad_y_ND = (grad_TD.index_select(0, src_N).to(acc) * w_sorted).to(y_ND.dtype)
    grad_w_N = torch.empty(N, dtype=acc, device=y_ND.device)
    chunk = max(1, (1 << 18) // max(D, 1))  # ~1 MB of fp32 rows per step
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        y_c = y_ND.index_select(0, row_map_N[s * k : e * k]).view(e - s, k, D).to(acc)
        # multiply in place (y_c is this chunk's own gather) and sum: a [c, k, D] @ [c, D, 1]
        # bmm of matrix-vector products took 1.8 ms here, this 0.7 (T=4096, D=512, top-1, CPU)
        y_c.mul_(grad_TD[s:e].to(acc).unsqueeze(1))
        torch.sum(y_c, -1, out=grad_w_N[s * k : e * k].view(-1, k))
    return grad_y_ND, grad_w_N.view(T, k).to(weights_TK.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gather_rows_kernel(
        src_ptr,
        idx_ptr,
        dst_ptr,
        N,
        D,
        stride_s,
        stride_d,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dst[r, :] = src[idx[r], :] for a block of BLOCK_R rows x BLOCK_D columns."""
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        # int64 rows: row * stride overflows int32 once N*D >= 2**31 (T=65536, k=8, D=5120)
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < N
        m2 = rmask[:, None] & (cols[None, :] < D)
        src_rows = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        v = tl.load(src_ptr + src_rows[:, None] * stride_s + cols[None, :], mask=m2)
        tl.store(dst_ptr + rows[:, None] * stride_d + cols[None, :], v, mask=m2)

    @triton.jit
    def _combine_kernel(
        y_ptr,
        rm_ptr,
        w_ptr,
        out_ptr,
        T,
        D,
        stride_y,
        stride_o,
        K: tl.constexpr,
        HAS_W: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[t] = sum_j w[t, j] * y[row_map[t*K + j]]; fp32 accumulation."""
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: see the gather
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < T
        m2 = rmask[:, None] & (cols[None, :] < D)
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(rm_ptr + rows * K + j, mask=rmask, other=0).to(tl.int64)
            v = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=m2, other=0.0)
            v = v.to(tl.float32)
            if HAS_W:
                wj = tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
                v = v * wj[:, None]
            acc += v
        tl.store(
            out_ptr + rows[:, None] * stride_o + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=m2,
        )

    @triton.jit
    def _unpermute_bwd_kernel(
        g_ptr,
        y_ptr,
        rm_ptr,
        w_ptr,
        gy_ptr,
        gw_ptr,
        T,
        D,
        stride_g,
        stride_y,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """grad_y[row_map[t*K+j]] = w[t,j] * g[t];  grad_w[t,j] = <g[t], y[row_map[t*K+j]]>."""
        pid_t = tl.program_id(0)
        rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: see the gather
        rmask = rows < T
        for j in tl.static_range(K):
            r = tl.load(rm_ptr + rows * K + j, mask=rmask, other=0).to(tl.int64)
            wj = tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
            dot = tl.zeros([BLOCK_T], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                m2 = rmask[:, None] & (cols[None, :] < D)
                g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=m2, other=0.0)
                g = g.to(tl.float32)
                y = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=m2, other=0.0)
                y = y.to(tl.float32)
                dot += tl.sum(g * y, axis=1)
                tl.store(
                    gy_ptr + r[:, None] * D + cols[None, :],
                    (g * wj[:, None]).to(gy_ptr.dtype.element_ty),
                    mask=m2,
                )
            tl.store(gw_ptr + rows * K + j, dot, mask=rmask)


def _row_blocks(rows: int, D: int, cuda: bool, gpu_elems: int = 4096, gpu_d: int = 256):
    """(BLOCK_R, BLOCK_D) of the row kernels.

    Interpreter: ~16K elements per program (amortises its per-program cost).  GPU: ~4K
    (16 x 256): 32 fp32 values per thread at 4 warps, no spills for any k <= 8 (the `sm90` tier
    checks), and T/16 programs -- 512 at T=8192, several waves on 132 SMs.  The 64 x 256 tiles
    the interpreter uses made the unpermute backward spill 4.7 KB per thread at fp32 k=8.
    """
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), gpu_d if cuda else 256)
    elems = gpu_elems if cuda else 16384
    BLOCK_R = max(1, min(triton.next_power_of_2(max(rows, 1)), elems // BLOCK_D))
    check_block("BLOCK_D", BLOCK_D)
    check_block("BLOCK_R", BLOCK_R)
    return BLOCK_R, BLOCK_D


# the unpermute backward holds g and y tiles and a row dot per slot: 16 x 128 on GPU
# (56 registers, no spills at k=8 fp32; see _row_blocks)
_UNPERMUTE_BWD_GPU = dict(gpu_elems=2048, gpu_d=128)


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _gather_rows_triton(src_SD: Tensor, idx_N: Tensor) -> Tensor:
    src_SD = _rowmajor(src_SD)
    N, D = idx_N.shape[0], src_SD.shape[1]
    out = torch.empty(N, D, dtype=src_SD.dtype, device=src_SD.device)
    if N == 0 or D == 0:
        return out
    BLOCK_R, BLOCK_D = _row_blocks(N, D, src_SD.is_cuda)
    grid = (triton.cdiv(N, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _gather_rows_kernel[grid](
        src_SD, idx_N, out, N, D, src_SD.stride(0), out.stride(0), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D
    )
    return out


def _combine_triton(y_ND, row_map_N, weights_TK, T: int, k: int):
    y_ND = _rowmajor(y_ND)
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=y_ND.dtype, device=y_ND.device)
    if T == 0 or D == 0:
        return out
    BLOCK_T, BLOCK_D = _row_blocks(T * k, D, y_ND.is_cuda)
    if not y_ND.is_cuda:  # interpreter: ~16K gathered elements per program
        BLOCK_T = max(1, BLOCK_T // triton.next_power_of_2(k))
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    w = weights_TK.contiguous() if weights_TK is not None else y_ND  # dummy pointer if no W
    _combine_kernel[grid](
        y_ND,
        row_map_N,
        w,
        out,
        T,
        D,
        y_ND.stride(0),
        out.stride(0),
        K=k,
        HAS_W=weights_TK is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
    )
    return out


def _permute_fwd_triton(x_TD: Tensor, experts_TK: Tensor):
    src_N, row_map_N = _source_rows(experts_TK)
    return _gather_rows_triton(x_TD, src_N), row_map_N


def _unpermute_bwd_triton(grad_TD, y_ND, row_map_N, weights_TK):
    T, k = weights_TK.shape
    y_ND = _rowmajor(y_ND)
    grad_TD = _rowmajor(grad_TD)
    D = y_ND.shape[1]
    grad_y = torch.empty_like(y_ND, memory_format=torch.contiguous_format)
    grad_w = torch.empty(T, k, dtype=torch.float32, device=y_ND.device)  # every slot written
    if T > 0 and D > 0:
        BLOCK_T, BLOCK_D = _row_blocks(T, D, y_ND.is_cuda, **_UNPERMUTE_BWD_GPU)
        _unpermute_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            grad_TD,
            y_ND,
            row_map_N,
            weights_TK.contiguous(),
            grad_y,
            grad_w,
            T,
            D,
            grad_TD.stride(0),
            y_ND.stride(0),
            K=k,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
        )
    elif T > 0:
        grad_y.zero_()
        grad_w.zero_()
    return grad_y, grad_w.to(weights_TK.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sigma_moe::permute_fwd", mutates_args=())
def _permute_fwd_op(x_TD: Tensor, experts_TK: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return _permute_fwd_torch(x_TD, experts_TK)
    return _permute_fwd_triton(x_TD, experts_TK)


@_permute_fwd_op.register_fake
def _(x_TD, experts_TK, backend):
    N = experts_TK.shape[0] * experts_TK.shape[1]
    return x_TD.new_empty(N, x_TD.shape[1]), experts_TK.new_empty(N, dtype=torch.int64)


@torch.library.custom_op("sigma_moe::combine", mutates_args=())
def _combine_op(
    y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor | None, T: int, k: int, backend: str
) -> Tensor:
    """Weighted (or, with weights None, plain) k-way sum of rows back to token order."""
    if backend == "torch":
        out = _combine_torch(y_ND, row_map_N, weights_TK, T, k)
        return out.clone() if out.data_ptr() == y_ND.data_ptr() else out
    return _combine_triton(y_ND, row_map_N, weights_TK, T, k)


@_combine_op.register_fake
def _(y_ND, row_map_N, weights_TK, T, k, backend):
    return y_ND.new_empty(T, y_ND.shape[1])


@torch.library.custom_op("sigma_moe::unpermute_bwd", mutates_args=())
def _unpermute_bwd_op(
    grad_TD: Tensor, y_ND: Tensor, row_map_N: Tensor, weights_TK: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return _unpermute_bwd_torch(grad_TD, y_ND, row_map_N, weights_TK)
    return _unpermute_bwd_triton(grad_TD, y_ND, row_map_N, weights_TK)


@_unpermute_bwd_op.register_fake
def _(grad_TD, y_ND, row_map_N, weights_TK, backend):
    return torch.empty_like(y_ND), torch.empty_like(weights_TK)


# permute: grad_x[t] = sum_j grad_sorted[row_map[t*k+j]]  (the combine with unit weights)
def _permute_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    x_TD, experts_TK, backend = inputs
    ctx.save_for_backward(output[1])
    ctx.T, ctx.k, ctx.backend, ctx.dtype = x_TD.shape[0], experts_TK.shape[1], backend, x_TD.dtype


def _permute_backward(ctx, grad_sorted_ND, grad_row_map):
    (row_map_N,) = ctx.saved_tensors
    if grad_sorted_ND is None:
        return None, None, None
    grad_x = _combine_op(grad_sorted_ND.contiguous(), row_map_N, None, ctx.T, ctx.k, ctx.backend)
    return grad_x.to(ctx.dtype), None, None


torch.library.register_autograd(
    "sigma_moe::permute_fwd", _permute_backward, setup_context=_permute_setup
)


def _combine_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    y_ND, row_map_N, weights_TK, T, k, backend = inputs
    ctx.save_for_backward(y_ND, row_map_N, weights_TK)
    ctx.backend = backend


def _combine_backward(ctx, grad_TD):
    y_ND, row_map_N, weights_TK = ctx.saved_tensors
    if grad_TD is None:
        return None, None, None, None, None, None
    if weights_TK is None:  # only used internally as permute's backward (no double backward)
        raise RuntimeError("double backward through permute is not supported")
    grad_y, grad_w = _unpermute_bwd_op(
        grad_TD.contiguous(), y_ND, row_map_N, weights_TK, ctx.backend
    )
    return grad_y, None, grad_w, None, None, None


torch.library.register_autograd(
    "sigma_moe::combine", _combine_backward, setup_context=_combine_setup
)


def permute(x_TD: Tensor, experts_TK: Tensor, *, backend: str = "auto"):
    """Group (token, slot) rows by expert; returns ``(x_sorted_ND, row_map_N)``."""
    _check_permute(x_TD, experts_TK)
    be = resolve_backend(backend, x_TD, experts_TK)
    return _permute_fwd_op(x_TD, experts_TK.to(torch.int64), be)


def unpermute(y_ND: Tensor, row_map: Tensor, weights_TK: Tensor, *, backend: str = "auto"):
    """``y_TD[t] = sum_j weights_TK[t, j] * y_ND[row_map[t*k + j]]``."""
    _check_unpermute(y_ND, row_map, weights_TK)
    be = resolve_backend(backend, y_ND, row_map, weights_TK)
    T, k = weights_TK.shape
    return _combine_op(y_ND, row_map, weights_TK, T, k, be)


def sort_rows(experts_TK: Tensor) -> tuple[Tensor, Tensor]:
    """``(gather_N, row_map_N)`` of ``permute`` without moving any row: sorted row r holds
    ``x_TD[gather_N[r]]``; ``row_map`` as ``permute`` returns it. For ``grouped_swiglu(x_TD,
    ..., gather_N=gather_N)``, which gathers the rows itself (no N x D tensor saved)."""
    if not isinstance(experts_TK, Tensor) or experts_TK.dim() != 2:
        raise ValueError(f"experts_TK must be a 2-D tensor [tokens, k], got {_shape(experts_TK)}")
    with torch.no_grad():
        return _source_rows(experts_TK.to(torch.int64))
