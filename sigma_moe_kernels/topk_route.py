"""Router: float32 softmax over all experts + top-k selection (op family ``topk_route``).

``topk_route(logits_TE, k, normalize=False)`` returns

* ``weights_TK``  float32 -- the k largest softmax probabilities of each token (divided by their
  sum when ``normalize=True``), in descending order;
* ``experts_TK``  int64   -- their expert ids; ties go to the lower expert index;
* ``tokens_per_expert_E`` int64 -- how many (token, slot) pairs each expert received;
* ``prob_sum_E``  float32 -- sum over tokens of each expert's probability (for the
  load-balancing loss; differentiable).

Gradients reach ``logits_TE`` through ``weights_TK`` and ``prob_sum_E``.

Contents: the torch reference, the torch backend (fast CPU path), the Triton kernels (one
program per block of ``BLOCK_T`` tokens, all experts of a row in registers), their launcher,
and the ``torch.library`` custom ops + autograd registration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, check_block, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["topk_route", "topk_route_reference"]


# ----------------------------------------------------------------------------------------------
# Reference (plain autograd through torch ops)
# ----------------------------------------------------------------------------------------------
def topk_route_reference(logits_TE: Tensor, k: int, *, normalize: bool = False):
    """Naive reference: softmax, stable descending sort (ties -> lower index), first k."""
    _check_args(logits_TE, k)
    E = logits_TE.shape[1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    vals_TE, idx_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    weights_TK = vals_TE[:, :k]
    experts_TK = idx_TE[:, :k].contiguous()
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    tokens_per_expert_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    prob_sum_E = probs_TE.sum(dim=0)
    return weights_TK, experts_TK, tokens_per_expert_E, prob_sum_E


def _check_args(logits_TE: Tensor, k: int) -> None:
    if not isinstance(logits_TE, Tensor) or logits_TE.dim() != 2:
        raise ValueError(
            f"logits_TE must be a 2-D tensor [tokens, experts], got "
            f"{getattr(logits_TE, 'shape', type(logits_TE))}"
        )
    if not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be floating point, got {logits_TE.dtype}")
    E = logits_TE.shape[1]
    if E < 1:
        raise ValueError("logits_TE must have at least one expert column")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k > E:
        raise ValueError(f"k must satisfy 1 <= k <= num_experts={E}, got k={k}")


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------
def _fwd_torch(logits_TE: Tensor, k: int, normalize: bool):
    E = logits_TE.shape[1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if k == 1:
        # max/argmax return the first maximal index -> ties go to the lower expert.
        weights_TK, experts_TK = probs_TE.max(dim=-1, keepdim=True)
    else:
        # torch.topk gives no tie-order guarantee; a stable sort does (E <= ~256, cheap:
        # T=4096, E=96 sorts in ~1 ms on 2 cores).
        vals_TE, idx_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
        weights_TK = vals_TE[:, :k].contiguous()
        experts_TK = idx_TE[:, :k].contiguous()
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    tokens_per_expert_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    prob_sum_E = probs_TE.sum(dim=0)
    return weights_TK, experts_TK, tokens_per_expert_E, prob_sum_E, probs_TE


def _bwd_torch(grad_w_TK, grad_ps_E, probs_TE, experts_TK, weights_TK, normalize: bool):
    if normalize:
        # w = p_sel / s  ->  dL/dp_sel = (g - <g, w>) / s
        s_T1 = probs_TE.gather(1, experts_TK).sum(dim=-1, keepdim=True)
        grad_w_TK = (grad_w_TK - (grad_w_TK * weights_TK).sum(-1, keepdim=True)) / s_T1
    g_TE = grad_ps_E.unsqueeze(0).expand_as(probs_TE).clone()
    g_TE.scatter_add_(1, experts_TK, grad_w_TK)
    # softmax backward: p * (g - <p, g>)
    return probs_TE * (g_TE - (probs_TE * g_TE).sum(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _topk_route_fwd_kernel(
        logits_ptr,
        w_ptr,
        e_ptr,
        probs_ptr,
        psum_ptr,
        cnt_ptr,
        T,
        E,
        stride_lt,
        K: tl.constexpr,
        NORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        kcols = tl.arange(0, BLOCK_K)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        # load in the input dtype, compute in fp32 (bf16 arithmetic is wrong in the interpreter)
        x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=m2, other=0.0)
        x = x.to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        mx = tl.max(x, axis=1)
        ex = tl.exp(x - mx[:, None])
        den = tl.sum(ex, axis=1)
        p = ex / den[:, None]
        p = tl.where(m2, p, 0.0)
        tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=m2)
        # per-program partial sums (reduced by torch: deterministic, no atomics)
        tl.store(psum_ptr + pid * E + cols, tl.sum(p, axis=0), mask=cmask)

        work = tl.where(cmask[None, :], p, -1.0)
        w_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        e_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(work, axis=1)
            # lowest index among the maxima -> ties go to the lower expert
            idx = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
            sel = cols[None, :] == idx[:, None]
            w_acc = tl.where(kcols[None, :] == j, best[:, None], w_acc)
            e_acc = tl.where(kcols[None, :] == j, idx[:, None], e_acc)
            cnt += tl.sum(tl.where(sel & rmask[:, None], 1, 0), axis=0)
            work = tl.where(sel, -2.0, work)
        if NORMALIZE:
            tot = tl.where(rmask, tl.sum(w_acc, axis=1), 1.0)  # padded rows: avoid 0/0
            w_acc = w_acc / tot[:, None]
        mk = rmask[:, None] & (kcols[None, :] < K)
        tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w_acc, mask=mk)
        tl.store(e_ptr + rows[:, None] * K + kcols[None, :], e_acc.to(tl.int64), mask=mk)
        tl.store(cnt_ptr + pid * E + cols, cnt, mask=cmask)

    @triton.jit
    def _topk_route_bwd_kernel(
        gw_ptr,
        gps_ptr,
        probs_ptr,
        e_ptr,
        w_ptr,
        gl_ptr,
        T,
        E,
        K: tl.constexpr,
        NORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=m2, other=0.0)
        gps = tl.load(gps_ptr + cols, mask=cmask, other=0.0)
        g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + gps[None, :]
        if NORMALIZE:
            s = tl.zeros([BLOCK_T], dtype=tl.float32)
            dot = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in tl.static_range(K):
                ej = tl.load(e_ptr + rows * K + j, mask=rmask, other=0)
                gwj = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0)
                wj = tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0)
                s += tl.sum(tl.where(cols[None, :] == ej[:, None], p, 0.0), axis=1)
                dot += gwj * wj
            s = tl.where(rmask, s, 1.0)
        for j in tl.static_range(K):
            ej = tl.load(e_ptr + rows * K + j, mask=rmask, other=0)
            gwj = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0)
            if NORMALIZE:
                gwj = (gwj - dot) / s
            g += tl.where(cols[None, :] == ej[:, None], gwj[:, None], 0.0)
        gl = p * (g - tl.sum(p * g, axis=1)[:, None])
        tl.store(gl_ptr + rows[:, None] * E + cols[None, :], gl, mask=m2)


def _blocks(T: int, E: int, cuda: bool):
    BLOCK_E = triton.next_power_of_2(E)
    # Interpreter: ~8K fp32 elements of the probability tile per program, so that per-program
    # overhead does not dominate.  GPU: 2K (16 rows at E=96): the 8K tiles used 255 registers
    # and spilled at k=8 (backward 1.6-2.3 KB per thread); 16 x 128 compiles without spills
    # for every k <= 8 (the `sm90` tier checks) and gives T/16 programs (512 at T=8192).
    elems = 2048 if cuda else 8192
    BLOCK_T = max(1, min(triton.next_power_of_2(max(T, 1)), elems // BLOCK_E))
    check_block("BLOCK_E", BLOCK_E)
    check_block("BLOCK_T", BLOCK_T)
    return BLOCK_T, BLOCK_E


def _fwd_triton(logits_TE: Tensor, k: int, normalize: bool):
    T, E = logits_TE.shape
    dev = logits_TE.device
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    BLOCK_T, BLOCK_E = _blocks(T, E, logits_TE.is_cuda)
    n_prog = triton.cdiv(T, BLOCK_T)
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=dev)
    experts_TK = torch.empty(T, k, dtype=torch.int64, device=dev)
    probs_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    psum_PE = torch.zeros(max(n_prog, 1), E, dtype=torch.float32, device=dev)
    cnt_PE = torch.zeros(max(n_prog, 1), E, dtype=torch.int32, device=dev)
    if T > 0:
        _topk_route_fwd_kernel[(n_prog,)](
            logits_TE,
            weights_TK,
            experts_TK,
            probs_TE,
            psum_PE,
            cnt_PE,
            T,
            E,
            logits_TE.stride(0),
            K=k,
            NORMALIZE=normalize,
            BLOCK_T=BLOCK_T,
            BLOCK_E=BLOCK_E,
            BLOCK_K=triton.next_power_of_2(k),
        )
    return weights_TK, experts_TK, cnt_PE.sum(0).to(torch.int64), psum_PE.sum(0), probs_TE


def _bwd_triton(grad_w_TK, grad_ps_E, probs_TE, experts_TK, weights_TK, normalize: bool):
    T, E = probs_TE.shape
    k = experts_TK.shape[1]
    grad_TE = torch.empty(T, E, dtype=torch.float32, device=probs_TE.device)
    if T > 0:
        BLOCK_T, BLOCK_E = _blocks(T, E, probs_TE.is_cuda)
        _topk_route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            grad_w_TK.float().contiguous(),
            grad_ps_E.float().contiguous(),
            probs_TE,
            experts_TK,
            weights_TK,
            grad_TE,
            T,
            E,
            K=k,
            NORMALIZE=normalize,
            BLOCK_T=BLOCK_T,
            BLOCK_E=BLOCK_E,
        )
    return grad_TE


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sigma_moe::topk_route_fwd", mutates_args=())
def _topk_route_fwd_op(
    logits_TE: Tensor, k: int, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _fwd_torch(logits_TE, k, normalize)
    return _fwd_triton(logits_TE, k, normalize)


@_topk_route_fwd_op.register_fake
def _(logits_TE, k, normalize, backend):
    T, E = logits_TE.shape
    f32 = dict(dtype=torch.float32, device=logits_TE.device)
    i64 = dict(dtype=torch.int64, device=logits_TE.device)
    return (
        logits_TE.new_empty(T, k, **f32),
        logits_TE.new_empty(T, k, **i64),
        logits_TE.new_empty(E, **i64),
        logits_TE.new_empty(E, **f32),
        logits_TE.new_empty(T, E, **f32),
    )


@torch.library.custom_op("sigma_moe::topk_route_bwd", mutates_args=())
def _topk_route_bwd_op(
    grad_w_TK: Tensor,
    grad_ps_E: Tensor,
    probs_TE: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    normalize: bool,
    backend: str,
) -> Tensor:
    if backend == "torch":
        return _bwd_torch(grad_w_TK, grad_ps_E, probs_TE, experts_TK, weights_TK, normalize)
    return _bwd_triton(grad_w_TK, grad_ps_E, probs_TE, experts_TK, weights_TK, normalize)


@_topk_route_bwd_op.register_fake
def _(grad_w_TK, grad_ps_E, probs_TE, experts_TK, weights_TK, normalize, backend):
    return torch.empty_like(probs_TE)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    logits_TE, k, normalize, backend = inputs
    weights_TK, experts_TK, _, _, probs_TE = output
    ctx.save_for_backward(probs_TE, experts_TK, weights_TK)
    ctx.normalize = normalize
    ctx.backend = backend
    ctx.logits_dtype = logits_TE.dtype


def _backward(ctx, grad_w_TK, grad_e, grad_cnt, grad_ps_E, grad_probs):
    probs_TE, experts_TK, weights_TK = ctx.saved_tensors
    if grad_w_TK is None:
        grad_w_TK = torch.zeros_like(weights_TK)
    if grad_ps_E is None:
        grad_ps_E = probs_TE.new_zeros(probs_TE.shape[1])
    grad_TE = _topk_route_bwd_op(
        grad_w_TK.float().contiguous(),
        grad_ps_E.float().contiguous(),
        probs_TE,
        experts_TK,
        weights_TK,
        ctx.normalize,
        ctx.backend,
    )
    if grad_probs is not None:  # probs_TE is internal, but stay correct if someone used it
        grad_TE = grad_TE + probs_TE * (grad_probs - (probs_TE * grad_probs).sum(-1, keepdim=True))
    return grad_TE.to(ctx.logits_dtype), None, None, None


torch.library.register_autograd(
    "sigma_moe::topk_route_fwd", _backward, setup_context=_setup_context
)


def topk_route(logits_TE: Tensor, k: int, *, normalize: bool = False, backend: str = "auto"):
    """Softmax router with top-k selection; see the module docstring for the contract."""
    _check_args(logits_TE, k)
    be = resolve_backend(backend, logits_TE)
    weights_TK, experts_TK, tokens_per_expert_E, prob_sum_E, _ = _topk_route_fwd_op(
        logits_TE, k, bool(normalize), be
    )
    return weights_TK, experts_TK, tokens_per_expert_E, prob_sum_E
