"""Expert parallelism: the token exchange between the ranks of one expert-parallel group.

Rank r of an EP group of size P owns the global experts [r·L, (r+1)·L), L = E / P. A MoE layer
routes its tokens, sorts the (token, slot) rows by global expert (`K.permute`), then

    x_local_MD, tokens_per_local_expert_L, ctx = ep.dispatch(x_sorted_ND, tokens_per_expert_E)
    y_local_MD = grouped_swiglu(x_local_MD, tokens_per_local_expert_L, <local experts>)
    y_sorted_ND = ep.combine(y_local_MD, ctx)

`dispatch` exchanges the per-expert counts (one small `all_to_all_single`), then the rows
(`all_to_all_single` with uneven splits; a rank may send or receive nothing), then regroups the
received rows so each local expert's rows are contiguous: the buffer arrives as
[source s][local expert l] blocks and the experts need [local expert l][source s]. `combine` is
the exact inverse. Both are differentiable: the backward of an exchange is the reverse exchange,
the backward of a regrouping gather is the inverse gather.

Host syncs: one per `dispatch` (the split sizes must be Python ints for `all_to_all_single`);
`combine` and both backwards reuse them. Works on any backend that implements
`all_to_all_single` with uneven splits (NCCL on CUDA tensors, gloo on CPU tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows; backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group):  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x_ND, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        return _exchange(grad_MD, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(
    x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group
) -> torch.Tensor:
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(
        out, x_ND, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
    )
    return out


class _Gather(torch.autograd.Function):
    """`x[index]` for a permutation `index` (with its inverse): the backward is a gather too,
    so no scatter-add and no atomics on GPU."""

    @staticmethod
    def forward(ctx, x_ND, index_N, inverse_N):  # type: ignore[override]
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


@dataclass
class DispatchContext:
    """What `combine` needs to undo one `dispatch` (opaque to callers)."""

    send_splits: list[int]  # rows this rank sent to each EP rank
    recv_splits: list[int]  # rows this rank received from each EP rank
    # Received order ([source][local expert]) → expert-major order and back; None when L == 1
    # or P == 1 (the received buffer is already expert-contiguous).
    to_local_M: torch.Tensor | None
    to_recv_M: torch.Tensor | None


class ExpertParallel:
    """Token exchange over one expert-parallel process group.

    `group`: a `torch.distributed` process group (DeepSpeed's `ep_size_{P}` group); its size is
    the EP size P. `num_experts`: E, the global number of experts of the layer; P must divide E.
    """

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group=group)
        self.ep_rank = dist.get_rank(group=group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"ExpertParallel: ep_size {self.ep_size} does not divide num_experts {num_experts}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first expert."""
        return self.ep_rank * self.num_local_experts

    def __repr__(self) -> str:
        return (
            f"ExpertParallel(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
            f"num_experts={self.num_experts}, num_local_experts={self.num_local_experts})"
        )

    # ------------------------------------------------------------------ dispatch / combine

    def dispatch(
        self, x_sorted_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Send each row to the rank owning its expert.

        `x_sorted_ND`: rows sorted by global expert id (ascending); `tokens_per_expert_E`:
        int64 [E], rows per global expert (sums to N). Returns `(x_local_MD,
        tokens_per_local_expert_L, ctx)`: the rows for this rank's L experts, grouped by local
        expert (within an expert: source rank order, then the source's order), their counts
        (int64 [L], on the input's device), and the context `combine` needs.
        """
        P, L, E = self.ep_size, self.num_local_experts, self.num_experts
        if tokens_per_expert_E.shape != (E,):
            raise ValueError(
                f"dispatch: tokens_per_expert_E has shape {tuple(tokens_per_expert_E.shape)}, "
                f"expected ({E},)"
            )
        if x_sorted_ND.dim() < 1:
            raise ValueError("dispatch: x_sorted_ND must have a leading row dimension")
        send_counts_PL = tokens_per_expert_E.to(torch.int64).reshape(P, L).contiguous()
        # 1. Counts: destination rank p gets our counts for its experts [p·L, (p+1)·L).
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
        # The one host sync: both directions' split sizes.
        host = torch.cat([send_counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
        send_splits, recv_splits = host[:P], host[P:]
        if sum(send_splits) != x_sorted_ND.shape[0]:
            raise ValueError(
                f"dispatch: tokens_per_expert_E sums to {sum(send_splits)} but x_sorted_ND has "
                f"{x_sorted_ND.shape[0]} rows"
            )
        # 2. Rows.
        x_recv_MD = _AllToAll.apply(x_sorted_ND, recv_splits, send_splits, self.group)
        tokens_per_local_L = recv_counts_PL.sum(0)
        # 3. Regroup [source][expert] → [expert][source].
        to_local = to_recv = None
        if P > 1 and L > 1:
            to_local, to_recv = _block_transpose_index(recv_counts_PL, x_recv_MD.shape[0])
            x_local_MD = _Gather.apply(x_recv_MD, to_local, to_recv)
        else:
            x_local_MD = x_recv_MD
        return (
            x_local_MD,
            tokens_per_local_L,
            DispatchContext(send_splits, recv_splits, to_local, to_recv),
        )

    def combine(self, y_local_MD: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """The inverse of `dispatch`: rows back to the ranks (and positions) they came from."""
        if y_local_MD.shape[0] != sum(ctx.recv_splits):
            raise ValueError(
                f"combine: y_local_MD has {y_local_MD.shape[0]} rows, dispatch delivered "
                f"{sum(ctx.recv_splits)}"
            )
        if ctx.to_recv_M is not None:
            y_local_MD = _Gather.apply(y_local_MD, ctx.to_recv_M, ctx.to_local_M)
        return _AllToAll.apply(y_local_MD, ctx.send_splits, ctx.recv_splits, self.group)


def _block_transpose_index(counts_PL: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index permutations between the [P][L] block order (received) and the [L][P] block order
    (expert-major) of a buffer of M rows whose block (s, l) holds `counts_PL[s, l]` rows.

    Returns `(to_local, to_recv)`: `expert_major = recv[to_local]`, `recv = expert_major[to_recv]`.
    Built on the counts' device with M known on the host, so it costs no extra sync.
    """
    P, L = counts_PL.shape
    device = counts_PL.device
    flat = counts_PL.reshape(-1)
    recv_start_PL = (flat.cumsum(0) - flat).view(P, L)
    counts_T = counts_PL.t().reshape(-1)  # blocks in expert-major order (l, s)
    start_T = recv_start_PL.t().reshape(-1)
    local_start = counts_T.cumsum(0) - counts_T
    # Row i of expert-major block b sits at start_T[b] + i in the received buffer.
    block_of_row = torch.repeat_interleave(
        torch.arange(P * L, device=device), counts_T, output_size=M
    )
    rows = torch.arange(M, device=device)
    to_local = start_T[block_of_row] + (rows - local_start[block_of_row])
    to_recv = torch.empty_like(to_local)
    to_recv[to_local] = rows
    return to_local, to_recv
