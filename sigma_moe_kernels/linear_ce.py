"""linear_cross_entropy: LM head + per-token cross-entropy; above a logits-size budget in row
chunks, so no temporary is ever the whole [T, V] logits (nor their softmax or gradient).

    loss_T = linear_cross_entropy(h_TD, w_VD, labels_T)   # fp32, 0 where labels == -100

equals ``F.cross_entropy((h_TD @ w_VD.T).float(), labels_T, ignore_index=-100,
reduction="none")`` (``K.reference.linear_cross_entropy``) up to float rounding, with autograd
for ``h_TD`` and ``w_VD``. The loss stays per token (no reduction), so the caller may weight
tokens after the forward (Rho-1 picks them from this very loss): the gradient cannot be formed
in the forward as Liger's fused-linear-CE does (that needs the loss weights first).

Three paths, by the size of the fp32 logits (T x V x 4 bytes):
  * < 32 MiB: the unchunked reference (logits, log-softmax, gradient whole; simplest).
  * <= 256 MB ("keep"): row chunks; each chunk's log-softmax is saved for the backward, which
    needs only exp() of it. Three GEMMs in all, like the unchunked path, but every temporary is
    one chunk (16 MB at 512 rows of an 8k vocab). Saved: T x V x 4 bytes, what the unchunked
    path saves too.
  * above ("recompute"): row chunks, only h, the labels and the per-token log-sum-exp saved;
    the backward recomputes each chunk's logits (a fourth GEMM). Memory is one chunk's
    temporaries, where the unchunked path would hold 3 x 2.5 GB at 4096 x 151,936.

Why chunks at all where memory is no problem: on CPU every temporary stays under glibc's largest
mmap threshold (32 MiB). Larger blocks are mmap'ed and unmapped at every free, so each step
faults them in again (sigma_moe/_malloc.py; with both, a demo-cpu step at E=96 went from
~105,000 page faults and ~330 ms of system time to 1 fault, 2026-12-01). Why "keep" at the CPU
demo's 2048 x 8192 (64 MB): LM head + CE fwd+bwd, D=256, in-process alternating medians of 10,
quiet 2-core machine, 2026-12-01 (s4): keep 266 ms, unchunked 302 ms, recompute 373 ms (the
4th GEMM); the head's three GEMMs alone are ~234 ms at this machine's fp32 GEMM rate.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 512  # 512 x 8192 fp32 = 16 MB per temporary
# Up to this many bytes of fp32 logits the unchunked path runs (see "Why" above): glibc's largest
# mmap threshold. 2048 tokens x 8192 vocab (the CPU demo) is 64 MB: chunked, "keep".
UNCHUNKED_MAX_BYTES = 32 * 2**20
# Up to this many bytes the chunks' log-softmax is saved (no recompute GEMM in the backward):
# 8192 tokens x 8192 vocab; a 150k vocab recomputes from ~440 tokens up.
KEEP_MAX_BYTES = 256 * 2**20


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for 16-bit inputs, fp64 stays


def _chunk_logits(h_cD: Tensor, w_VD: Tensor) -> Tensor:
    return (h_cD @ w_VD.t()).to(_acc(h_cD.dtype))


class _LinearCE(torch.autograd.Function):
    """Row chunks; ``keep`` saves each chunk's fp32 log-softmax for the backward (3 GEMMs in
    all, as the unchunked path), else the backward recomputes each chunk's logits (4 GEMMs)."""

    @staticmethod
    def forward(ctx, h_TD: Tensor, w_VD: Tensor, labels_T: Tensor, chunk: int, keep: bool):
        T = h_TD.shape[0]
        loss_T = torch.empty(T, dtype=_acc(h_TD.dtype), device=h_TD.device)
        lse_T = torch.empty_like(loss_T)
        valid_T = labels_T != -100
        tgt_T1 = labels_T.clamp_min(0).unsqueeze(1)
        kept = []
        for i in range(0, T, chunk):
            j = min(i + chunk, T)
            logits_cV = _chunk_logits(h_TD[i:j], w_VD)
            if keep:  # one fused kernel; the chunk's log-probabilities are what backward needs
                logp_cV = torch.log_softmax(logits_cV, dim=-1)
                kept.append(logp_cV)
                loss_T[i:j] = logp_cV.gather(1, tgt_T1[i:j]).squeeze(1).neg_() * valid_T[i:j]
                continue
            lse = torch.logsumexp(logits_cV, dim=-1)
            lse_T[i:j] = lse
            loss_T[i:j] = (lse - logits_cV.gather(1, tgt_T1[i:j]).squeeze(1)) * valid_T[i:j]
        ctx.save_for_backward(h_TD, w_VD, tgt_T1, valid_T, lse_T, *kept)
        ctx.chunk = chunk
        return loss_T

    @staticmethod
    def backward(ctx, g_T: Tensor):
        h_TD, w_VD, tgt_T1, valid_T, lse_T, *kept = ctx.saved_tensors
        chunk, T = ctx.chunk, h_TD.shape[0]
        # d loss_t / d logits_t = softmax_t - onehot(label_t), times the token's upstream grad
        scale_T1 = (g_T.to(lse_T.dtype) * valid_T).unsqueeze(1)
        dh_TD = torch.empty_like(h_TD) if ctx.needs_input_grad[0] else None
        # fp32 accumulator: bf16 partial sums over chunks would round at every chunk
        dw_VD = torch.zeros(w_VD.shape, dtype=lse_T.dtype, device=w_VD.device)
        for n, i in enumerate(range(0, T, chunk)):
            j = min(i + chunk, T)
            if kept:
                p_cV = kept[n].exp()  # a new buffer: the saved one stays intact (retain_graph)
            else:
                p_cV = _chunk_logits(h_TD[i:j], w_VD).sub_(lse_T[i:j, None]).exp_()
            p_cV.scatter_add_(1, tgt_T1[i:j], torch.full_like(lse_T[i:j, None], -1.0))
            d_cV = p_cV.mul_(scale_T1[i:j]).to(h_TD.dtype)
            if dh_TD is not None:
                torch.mm(d_cV, w_VD, out=dh_TD[i:j])
            dw_VD.addmm_(d_cV.t().to(dw_VD.dtype), h_TD[i:j].to(dw_VD.dtype))
        dw = dw_VD.to(w_VD.dtype) if ctx.needs_input_grad[1] else None
        return dh_TD, dw, None, None, None


def linear_cross_entropy_reference(h_TD: Tensor, w_VD: Tensor, labels_T: Tensor) -> Tensor:
    """The plain torch meaning: full logits, then fp32 CE (what the model did before)."""
    logits_TV = torch.nn.functional.linear(h_TD, w_VD).to(_acc(h_TD.dtype))
    return torch.nn.functional.cross_entropy(
        logits_TV, labels_T, ignore_index=-100, reduction="none"
    )


def linear_cross_entropy(
    h_TD: Tensor,
    w_VD: Tensor,
    labels_T: Tensor,
    chunk: int | None = None,
    keep: bool | None = None,
) -> Tensor:
    """Per-token fp32 CE of ``h_TD @ w_VD.T`` against ``labels_T`` (-100 = ignored, loss 0).

    ``chunk=None``: the unchunked path while the fp32 logits stay under UNCHUNKED_MAX_BYTES,
    else chunks of CHUNK_ROWS rows; an int forces chunks of that many rows. ``keep=None``:
    save the chunks' log-softmax while the logits stay under KEEP_MAX_BYTES, else recompute
    them in the backward; a bool forces either."""
    if h_TD.dim() != 2 or w_VD.dim() != 2 or h_TD.shape[1] != w_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: h_TD {tuple(h_TD.shape)} and w_VD {tuple(w_VD.shape)} "
            "must be [T, D] and [V, D]"
        )
    if labels_T.shape != (h_TD.shape[0],):
        raise ValueError(
            f"linear_cross_entropy: labels_T {tuple(labels_T.shape)} must be [{h_TD.shape[0]}]"
        )
    if chunk is not None and chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    bad = (labels_T != -100) & ((labels_T < 0) | (labels_T >= w_VD.shape[0]))
    # (a host sync; skipped under torch.compile, where it would split the graph)
    if not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(
            f"linear_cross_entropy: labels must be -100 or in [0, {w_VD.shape[0]}), got "
            f"{labels_T[bad][:4].tolist()}"
        )
    logits_bytes = h_TD.shape[0] * w_VD.shape[0] * 4  # fp32
    if chunk is None:
        # "<": logits of exactly 32 MiB (1024 tokens x 8192, a demo-cpu micro-batch at EP=2)
        # plus malloc's header are over the threshold, mmap'ed at every step; chunked, the LM
        # head + CE fwd+bwd took 216 ms, not 233 ms (1 thread, D=256, medians of 12, 2026-12-02)
        if logits_bytes < UNCHUNKED_MAX_BYTES:
            return linear_cross_entropy_reference(h_TD, w_VD, labels_T)
        chunk = CHUNK_ROWS
    keep = logits_bytes <= KEEP_MAX_BYTES if keep is None else keep
    return _LinearCE.apply(h_TD, w_VD, labels_T, chunk, keep)
