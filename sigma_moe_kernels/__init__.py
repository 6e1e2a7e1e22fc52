"""sigma_moe_kernels: MoE kernels with a torch reference and torch / Triton backends.

Contract (``import sigma_moe_kernels as K``)::

    weights_TK, experts_TK, tokens_per_expert_E, prob_sum_E = K.topk_route(logits_TE, k)
    x_sorted_ND, row_map = K.permute(x_TD, experts_TK)
    y_sorted_ND = K.grouped_swiglu(x_sorted_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF,
                                   w_down_EFD)
    y_TD = K.unpermute(y_sorted_ND, row_map, weights_TK)
    # or the permutation fused into the experts (no N x D input saved for backward):
    gather_N, row_map = K.sort_rows(experts_TK)
    y_sorted_ND = K.grouped_swiglu(x_TD, tokens_per_expert_E, ..., gather_N=gather_N)
    # one process: whichever of the two the backend does best
    y_sorted_ND, row_map = K.routed_experts(x_TD, experts_TK, tokens_per_expert_E, ...)
    loss_T = K.linear_cross_entropy(h_TD, w_head_VD, labels_T)   # chunked LM head + fp32 CE

Every MoE op takes ``backend="auto" | "torch" | "triton" | "interpret"`` (see ``_backend``), has
autograd, is a ``torch.library`` custom op (traceable by ``torch.compile``), and has a plain
torch reference in ``K.reference`` (``linear_cross_entropy`` is plain torch: no Triton
version, no backend argument).  ``row_map`` is an int64 tensor of length N = T*k:
``row_map[t*k + j]`` is the row of ``x_sorted_ND`` holding (token t, slot j).
"""

from . import reference
from ._backend import BACKENDS, resolve_backend
from .grouped_swiglu import grouped_swiglu, routed_experts
from .linear_ce import linear_cross_entropy
from .permute import permute, sort_rows, unpermute
from .topk_route import topk_route

__all__ = [
    "BACKENDS",
    "grouped_swiglu",
    "linear_cross_entropy",
    "permute",
    "reference",
    "resolve_backend",
    "routed_experts",
    "sort_rows",
    "topk_route",
    "unpermute",
]
