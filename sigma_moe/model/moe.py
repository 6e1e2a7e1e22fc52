"""The MoE feed-forward layer: fp32 softmax router → top-k → permute → (all-to-all) →
grouped SwiGLU experts → (all-to-all back) → unpermute + weighted combine.

DeepSpeed only reduces expert gradients over the expert-data-parallel group, and only writes
per-rank expert files in checkpoints, for modules that are instances of
`deepspeed.moe.layer.MoE` (DeepSpeed 0.19.8's engine tests `isinstance(module, MoE)`). So the
layer is a thin subclass of it that skips its constructor and keeps our stacked local experts
where DeepSpeed looks for them: `deepspeed_moe.experts.deepspeed_experts[0]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

import sigma_moe_kernels as K
from sigma_moe.model.config import SigmaMoEConfig


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward (returned, never stashed in globals)."""

    lb_loss: torch.Tensor  # scalar, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert_E: torch.Tensor  # int64, this rank's tokens (before any all-reduce)
    dropped_tokens: int
    topk: int
    # Mean over tokens of the router distribution's entropy / log(E) (detached; 1 = uniform).
    router_entropy: torch.Tensor | None = None
    # [T, k] int64 (detached): each token's routed experts, for per-domain expert statistics.
    experts_TK: torch.Tensor | None = None


class StackedExperts(nn.Module):
    """This rank's experts in three stacked tensors (one grouped GEMM each).

    Each expert is initialised from its own generator seeded by (seed, layer, global expert id),
    so a model built with EP=2 holds exactly the slices of the EP=1 model built with the same seed.
    """

    def __init__(
        self, cfg: SigmaMoEConfig, layer_idx: int, first: int, num_local: int, out_std: float
    ):
        super().__init__()
        d, f = cfg.hidden_size, cfg.moe_ffn_size
        w_gate, w_up, w_down = [], [], []
        for e in range(first, first + num_local):
            g = torch.Generator().manual_seed(cfg.init_seed * 1_000_003 + layer_idx * 10_007 + e)
            w_gate.append(torch.randn(d, f, generator=g) * cfg.init_std)
            w_up.append(torch.randn(d, f, generator=g) * cfg.init_std)
            w_down.append(torch.randn(f, d, generator=g) * out_std)
        self.w_gate_EDF = nn.Parameter(torch.stack(w_gate))
        self.w_up_EDF = nn.Parameter(torch.stack(w_up))
        self.w_down_EFD = nn.Parameter(torch.stack(w_down))
        for p in self.parameters():
            # DeepSpeed's expert-parameter tags: reduce over the expert-data-parallel group only.
            p.allreduce = False
            p.group_name = f"ep_size_{cfg.ep_size}"


class _ExpertsHolder(nn.Module):
    def __init__(self, experts: StackedExperts):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([experts])


class _DeepSpeedMoEHolder(nn.Module):
    """Stands where DeepSpeed's MOELayer would (`.experts.deepspeed_experts`, `_set_ep_group`)."""

    def __init__(self, experts: StackedExperts):
        super().__init__()
        self.experts = _ExpertsHolder(experts)
        self.ep_group = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group


class SharedExperts(nn.Module):
    """`n` always-on SwiGLU experts of width F, stored fused as one SwiGLU of width n·F: the sum
    of n SwiGLUs equals one whose gate/up columns and down rows are theirs side by side, and one
    GEMM of n·F is faster than n of F. Dense parameters (reduced over the whole data-parallel
    world, not the expert-data-parallel group). No "expert" in any name: DeepSpeed moves every
    state-dict key of an MoE module containing "expert" into the per-EP-rank expert files."""

    def __init__(self, cfg: SigmaMoEConfig, layer_idx: int, out_std: float):
        super().__init__()
        d, f, n = cfg.hidden_size, cfg.moe_ffn_size, cfg.num_shared_experts
        # Own generator (not torch's global one): every rank builds the same weights, whatever
        # the EP layout, and adding shared experts leaves the routed experts' init unchanged.
        g = torch.Generator().manual_seed(cfg.init_seed * 1_000_003 + layer_idx * 10_007 - 1)
        self.w_gate_DF = nn.Parameter(torch.randn(d, n * f, generator=g) * cfg.init_std)
        self.w_up_DF = nn.Parameter(torch.randn(d, n * f, generator=g) * cfg.init_std)
        self.w_down_FD = nn.Parameter(torch.randn(n * f, d, generator=g) * out_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = nn.functional.silu(x_TD @ self.w_gate_DF) * (x_TD @ self.w_up_DF)
        return h_TF @ self.w_down_FD


class SigmaMoELayer(_DeepSpeedMoE):
    def __init__(self, cfg: SigmaMoEConfig, layer_idx: int, ep_rank: int = 0):
        nn.Module.__init__(self)  # DeepSpeed's own constructor builds its gate and expert copies
        self.layer_idx = layer_idx
        self.n_routed = cfg.num_experts
        self.topk = cfg.router_topk[layer_idx]
        self.lb_loss_type, self.capacity_factor = cfg.lb_loss_type, cfg.capacity_factor
        self.backend = cfg.kernel_backend
        # DeepSpeed's bookkeeping: one stacked "expert" module per EP rank.
        self.ep_size = cfg.ep_size
        self.num_experts = cfg.ep_size
        self.num_local_experts = 1
        self.expert_group_name = f"ep_size_{cfg.ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.n_local = cfg.num_experts // cfg.ep_size
        # fp32 router over all experts (Sigma-MoE-Tiny report): the weight stays fp32 under bf16.
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, 0, cfg.init_std)
        # GPT-2 residual scaling on the down projection (as o_proj in SigmaMoEForCausalLM).
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        experts = StackedExperts(cfg, layer_idx, ep_rank * self.n_local, self.n_local, out_std)
        self.deepspeed_moe = _DeepSpeedMoEHolder(experts)
        n_shared = cfg.num_shared_experts
        self.shared = SharedExperts(cfg, layer_idx, out_std) if n_shared > 0 else None
        # Aux-loss-free balancing (DeepSeek-V3): a buffer, not a parameter (no gradient, no
        # optimizer state), so it is saved with the module state and replicated on every rank.
        self.bias_update_rate = cfg.bias_update_rate
        if cfg.router_bias_update == "aux_free":
            self.register_buffer("router_bias_E", torch.zeros(cfg.num_experts))
        else:
            self.router_bias_E = None
        # Data-parallel group for the global-batch balance loss; None = this process alone.
        self.dp_group = None
        self.ep = None  # sigma_moe.parallel.expert_parallel.ExpertParallel when ep_size > 1

    @property
    def experts(self) -> StackedExperts:
        return self.deepspeed_moe.experts.deepspeed_experts[0]

    def _apply(self, fn, recurse=True):
        # The engine casts the module to bf16; the bias must stay fp32: steps of 1e-3 on a bias
        # of order 0.1 vanish in bf16 (8 mantissa bits: spacing 2^-11 at 0.1).
        super()._apply(fn, recurse)
        if self.router_bias_E is not None and self.router_bias_E.dtype != torch.float32:
            self.router_bias_E = self.router_bias_E.float()
        return self

    @torch.no_grad()
    def update_router_bias(self, counts_E: torch.Tensor) -> None:
        """b_i += rate · sign(mean load − load_i) from the GLOBAL batch's counts (the caller sums
        them over every micro-batch and data-parallel rank of the step)."""
        if self.router_bias_E is None:
            return
        c_E = counts_E.to(self.router_bias_E.device, torch.float64)
        step_E = torch.sign(c_E.mean() - c_E).to(torch.float32) * self.bias_update_rate
        self.router_bias_E += step_E

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize: create the EP/EDP groups only if they are missing."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

    # ------------------------------------------------------------------ forward

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:  # type: ignore[override]
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        # Router in fp32 even under bf16 training (the engine casts the module to bf16).
        logits_TE = nn.functional.linear(x_TD.float(), self.router.weight.float())
        probs_TE = None
        if self.router_bias_E is not None:
            weights_TK, experts_TK, counts_E, prob_sum_E, probs_TE = self._route_biased(logits_TE)
        else:
            weights_TK, experts_TK, counts_E, prob_sum_E = K.topk_route(
                logits_TE, self.topk, backend=self.backend
            )
        dropped = 0
        if self.capacity_factor is not None:
            weights_TK, dropped = self._apply_capacity(weights_TK, experts_TK)
        y_sorted_ND, row_map = self._experts(x_TD, experts_TK, counts_E)
        y_TD = K.unpermute(y_sorted_ND, row_map, weights_TK.to(x_TD.dtype), backend=self.backend)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if self.lb_loss_type == "sequence":
            if probs_TE is None:
                probs_TE = torch.softmax(logits_TE, dim=-1)
            lb_loss = self._sequence_loss(probs_TE.view(B, S, -1), experts_TK.view(B, -1))
        else:
            lb_loss = self._balance_loss(counts_E, prob_sum_E, B * S)
        stats = MoEStats(
            lb_loss=lb_loss,
            z_loss=torch.logsumexp(logits_TE, dim=-1).pow(2).mean(),
            tokens_per_expert_E=counts_E.detach(),
            dropped_tokens=dropped,
            topk=self.topk,
            router_entropy=_mean_entropy(logits_TE.detach()),
            experts_TK=experts_TK.detach(),
        )
        return y_TD.view(B, S, D), stats

    def _experts(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, counts_E: torch.Tensor):
        """The routed experts over expert-sorted rows: (y_sorted_ND, row_map)."""
        w = self.experts
        weights = (w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD)
        if self.ep is None:  # on the torch backend with the permutation fused in
            return K.routed_experts(x_TD, experts_TK, counts_E, *weights, backend=self.backend)
        x_sorted_ND, row_map = K.permute(x_TD, experts_TK, backend=self.backend)
        x_local_MD, counts_local_L, ctx = self.ep.dispatch(x_sorted_ND, counts_E)
        y_local_MD = K.grouped_swiglu(x_local_MD, counts_local_L, *weights, backend=self.backend)
        return self.ep.combine(y_local_MD, ctx), row_map

    def _balance_loss(
        self, counts_E: torch.Tensor, prob_sum_E: torch.Tensor, n_tokens: int
    ) -> torch.Tensor:
        """N_E · Σ_i f_i · p_i (Switch/GShard). f_i: share of routed (token, slot) pairs on expert
        i; p_i: mean router probability. `global_batch` sums the counts over the data-parallel
        group first: at top-1-of-96 the micro-batch version lets lower layers collapse
        (Sigma-MoE-Tiny report), because the loss can be minimal with a spiky f when p is flat."""
        if self.lb_loss_type == "none":
            return prob_sum_E.sum() * 0.0
        counts = counts_E.detach().float()
        if (
            self.lb_loss_type == "global_batch"
            and self.dp_group is not None
            and dist.is_initialized()
        ):
            counts = counts.clone()
            dist.all_reduce(counts, group=self.dp_group)
        f_E = counts / counts.sum().clamp_min(1.0)
        p_E = prob_sum_E / max(n_tokens, 1)
        return self.n_routed * (f_E * p_E).sum()

    def _route_biased(self, logits_TE: torch.Tensor):
        """Top-k by probability + bias; the gates stay the unbiased probabilities (DeepSeek-V3,
        Megatron-core's expert_bias), so the bias steers the choice and never the output scale.
        Plain torch: topk_route has no bias input, and a T×E softmax is small beside the
        experts (T·E vs T·k·3·D·F multiply-adds)."""
        probs_TE = torch.softmax(logits_TE, dim=-1)
        experts_TK = torch.topk(probs_TE.detach() + self.router_bias_E, self.topk, dim=-1).indices
        weights_TK = probs_TE.gather(1, experts_TK)
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.n_routed)
        return weights_TK, experts_TK, counts_E, probs_TE.sum(0), probs_TE

    def _sequence_loss(self, probs_BSE: torch.Tensor, experts_BN: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise loss (Megatron `seq_aux_loss`): the
        N_E·Σ f_i·p_i loss of each sequence on its own, averaged over the sequences."""
        B, S, E = probs_BSE.shape
        ones = torch.ones_like(experts_BN, dtype=torch.float32)
        counts_BE = torch.zeros(B, E, device=probs_BSE.device).scatter_add_(1, experts_BN, ones)
        f_BE = counts_BE / experts_BN.shape[1]
        return E * (f_BE * probs_BSE.mean(dim=1)).sum(dim=1).mean()

    def _apply_capacity(
        self, weights_TK: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Token dropping (optional; dropless by default): pairs beyond an expert's capacity
        ceil(cf · T·k / E), in token order, get gate 0 so only the residual carries them."""
        T, k = experts_TK.shape
        capacity = math.ceil(self.capacity_factor * T * k / self.n_routed)
        flat = experts_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_e = flat[order]
        starts = torch.searchsorted(sorted_e, sorted_e, right=False)
        pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts
        pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
        keep_TK = (pos < capacity).view(T, k)
        return weights_TK * keep_TK, int((~keep_TK).sum())


def _mean_entropy(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits) divided by log(E): 1 when every token's router
    is uniform, 0 when every token is sure of one expert."""
    logp_TE = torch.log_softmax(logits_TE.float(), dim=-1)
    ent_T = -(logp_TE.exp() * logp_TE).sum(dim=-1)
    return ent_T.mean() / math.log(max(logits_TE.shape[-1], 2))
