"""The MoE feed-forward layer: fp32 softmax router → top-k → permute → (all-to-all) →
grouped SwiGLU experts → (all-to-all back) → unpermute + weighted combine.

DeepSpeed only reduces expert gradients over the expert-data-parallel group, and only writes
per-rank expert files in checkpoints, for modules that are instances of
`deepspeed.moe.layer.MoE` (ENV-NOTES.md, "DeepSpeed with our own MoE layer"). So the layer is a
thin subclass of it that skips its constructor and keeps our stacked local experts where
DeepSpeed looks for them: `deepspeed_moe.experts.deepspeed_experts[0]`.
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
        # Data-parallel group for the global-batch balance loss; None = this process alone.
        self.dp_group = None
        self.ep = None  # sigma_moe.parallel.expert_parallel.ExpertParallel when ep_size > 1

    @property
    def experts(self) -> StackedExperts:
        return self.deepspeed_moe.experts.deepspeed_experts[0]

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
        weights_TK, experts_TK, counts_E, prob_sum_E = K.topk_route(
            logits_TE, self.topk, backend=self.backend
        )
        dropped = 0
        if self.capacity_factor is not None:
            weights_TK, dropped = self._apply_capacity(weights_TK, experts_TK)
        x_sorted_ND, row_map = K.permute(x_TD, experts_TK, backend=self.backend)
        w = self.experts
        if self.ep is None:
            y_sorted_ND = K.grouped_swiglu(
                x_sorted_ND, counts_E, w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD, backend=self.backend
            )
        else:
            x_local_MD, counts_local_L, ctx = self.ep.dispatch(x_sorted_ND, counts_E)
            y_local_MD = K.grouped_swiglu(
                x_local_MD,
                counts_local_L,
                w.w_gate_EDF,
                w.w_up_EDF,
                w.w_down_EFD,
                backend=self.backend,
            )
            y_sorted_ND = self.ep.combine(y_local_MD, ctx)
        y_TD = K.unpermute(y_sorted_ND, row_map, weights_TK.to(x_TD.dtype), backend=self.backend)
        stats = MoEStats(
            lb_loss=self._balance_loss(counts_E, prob_sum_E, B * S),
            z_loss=torch.logsumexp(logits_TE, dim=-1).pow(2).mean(),
            tokens_per_expert_E=counts_E.detach(),
            dropped_tokens=dropped,
            topk=self.topk,
        )
        return y_TD.view(B, S, D), stats

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
