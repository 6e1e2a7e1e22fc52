"""Grouped SwiGLU experts over expert-sorted rows (op family ``grouped_swiglu``).

``grouped_swiglu(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)`` -> ``y_ND``
where, for expert e owning rows ``[off_e, off_e + n_e)`` (``off`` = exclusive cumsum of
``tokens_per_expert_E``): ``y = (silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e]``.  Experts with zero
tokens are legal (their weight gradients are zero).  Gradients: x and all three weights.

With ``gather_N`` the permutation is fused in: the op takes the unsorted ``x_TD`` and reads row
r of the experts' input as ``x_TD[gather_N[r]]``; dx comes back for ``x_TD``.

Saved for backward: x (x_sorted, or x_TD and gather_N) and the two pre-activations ``h_gate_NF``
and ``h_up_NF``;
``silu(h_gate)*h_up`` is recomputed in backward (one cheap elementwise pass) instead of being
saved, which keeps the layer's peak memory near a dense FFN's.

The op family, one file per question: this file holds the op (``torch.library`` custom ops,
fake kernels for tracing, autograd, argument checks) and the reference; the implementations are
``grouped_swiglu_torch.py`` and ``grouped_swiglu_triton.py`` (tile tables in ``_gemm_tiles.py``);
the per-expert loop kept only for the benchmark is in ``sigma_moe/bench/swiglu_loop.py``.

Backends
* torch: one host sync (``tokens_per_expert.tolist()``), then MKL's grouped batch GEMM for fp32
  (``_mkl_batch.py``: experts spread over the threads), else ``torch._grouped_mm`` where it
  accepts the operands, else "ranged bmm": contiguous ranges of experts, each padded to its own
  largest expert, one ``torch.bmm`` per GEMM per range, written into preallocated outputs
  (``out=``); manual backward.  See the comment above ``_plan`` in ``grouped_swiglu_torch.py``
  for the measured alternatives.
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

from ._backend import resolve_backend
from ._gemm_tiles import check_precision
from .grouped_swiglu_torch import _bwd_torch_best, _fwd_torch_best, gathered_bwd
from .grouped_swiglu_triton import _bwd_triton, _fwd_triton
from .permute import permute, sort_rows

__all__ = ["grouped_swiglu", "grouped_swiglu_reference", "routed_experts"]


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
    gather_N: Tensor | None,
    backend: str,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y_ND, h_gate_NF, h_up_NF); the h_* are saved for backward."""
    if backend == "torch":
        return _fwd_torch_best(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, gather_N)
    if gather_N is not None:
        x_ND = x_ND.index_select(0, gather_N)
    return _fwd_triton(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, precision)


@_gs_fwd_op.register_fake
def _(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, gather_N, backend, precision):
    N, D = x_ND.shape if gather_N is None else (gather_N.shape[0], x_ND.shape[1])
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
    gather_N: Tensor | None,
    backend: str,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _bwd_torch_best(
            dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF, gather_N
        )
    rest = (counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF, precision)
    return gathered_bwd(_bwd_triton, x_ND, gather_N, dy_ND, *rest)


@_gs_bwd_op.register_fake
def _(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF, gather_N, backend, precision):
    # contiguous, as every implementation returns them (x_TD may be a strided view)
    return tuple(t.new_empty(t.shape) for t in (x_ND, wg_EDF, wu_EDF, wd_EFD))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    x_ND, counts_E, wg, wu, wd, gather_N, backend, precision = inputs
    _, hg, hu = output
    ctx.save_for_backward(x_ND, counts_E, wg, wu, wd, hg, hu, gather_N)
    ctx.backend = backend
    ctx.precision = precision


def _backward(ctx, dy_ND, _ghg, _ghu):
    x_ND, counts_E, wg, wu, wd, hg, hu, gather_N = ctx.saved_tensors
    if dy_ND is None:
        return None, None, None, None, None, None, None, None
    dx, dwg, dwu, dwd = _gs_bwd_op(
        dy_ND.contiguous(), x_ND, counts_E, wg, wu, wd, hg, hu, gather_N, ctx.backend, ctx.precision
    )
    return dx, None, dwg, dwu, dwd, None, None, None


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
    gather_N: Tensor | None = None,
) -> Tensor:
    """Per-expert SwiGLU over expert-sorted rows; see the module docstring.

    ``input_precision`` (Triton backends, fp32 only): "ieee" | "tf32x3" (fp32 accuracy) |
    "tf32" (fast, ~1e-3 relative error); None follows ``torch.get_float32_matmul_precision()``
    (see ``resolve_precision``).

    ``gather_N`` (int64 [N]): the permutation fused in. The first argument is then the
    unsorted ``x_TD`` and row r of the experts' input is ``x_TD[gather_N[r]]``
    (``K.sort_rows``); the gradient comes back for ``x_TD``. What is saved for backward is
    ``x_TD`` (which the router saves anyway) and the index, not the N gathered rows. The fp32
    CPU path (MKL) gathers them again chunk by chunk in backward; the other paths (16-bit,
    ``torch._grouped_mm``, ranged bmm, Triton) gather all N rows at once, and sum dx back with
    ``index_add_``, which on CUDA uses atomics (not bitwise reproducible for top-k > 1; the
    model's layer fuses only on the torch backend). Indices must be in ``[0, T)`` (not checked:
    a host sync). The output stays in sorted order (``K.unpermute`` takes it).
    """
    _check_args(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD)
    if gather_N is not None:
        _check_gather(gather_N, x_sorted_ND)
    be = resolve_backend(backend, x_sorted_ND, w_gate_EDF, w_up_EDF, w_down_EFD)
    prec = check_precision(input_precision)  # "auto" is resolved by the launcher
    outs = _gs_fwd_op(
        x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD, gather_N, be, prec
    )
    return outs[0]


def routed_experts(
    x_TD: Tensor,
    experts_TK: Tensor,
    tokens_per_expert_E: Tensor,
    w_gate_EDF: Tensor,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """permute + grouped_swiglu on one process: ``(y_sorted_ND, row_map)`` for ``unpermute``.

    On the torch backend the permutation is fused into the experts (``gather_N``): they save
    x_TD and an index, not N gathered rows (the MoE layer's peak activation memory 1.67x ->
    1.11x a dense FFN's, docs/benchmarks/train-2026-12-06.md). The Triton backends keep
    ``permute``'s gather and combine kernels (no atomics for top-k > 1)."""
    ws = (w_gate_EDF, w_up_EDF, w_down_EFD)
    if resolve_backend(backend, x_TD) == "torch":
        gather_N, row_map = sort_rows(experts_TK)
        y = grouped_swiglu(x_TD, tokens_per_expert_E, *ws, backend=backend, gather_N=gather_N)
        return y, row_map
    x_sorted_ND, row_map = permute(x_TD, experts_TK, backend=backend)
    return grouped_swiglu(x_sorted_ND, tokens_per_expert_E, *ws, backend=backend), row_map


def _check_gather(gather_N, x_TD) -> None:
    if not isinstance(gather_N, Tensor) or gather_N.dim() != 1 or gather_N.dtype != torch.int64:
        got = f"{_shape(gather_N)} {getattr(gather_N, 'dtype', '')}".strip()
        raise ValueError(f"gather_N must be a 1-D int64 tensor, got {got}")
    if gather_N.device != x_TD.device:
        raise ValueError(f"gather_N is on {gather_N.device} but x is on {x_TD.device}")
