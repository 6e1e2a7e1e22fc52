"""SigmaMoEForCausalLM: embed → N × [RMSNorm → GQA attention → RMSNorm → MoE FFN] → norm → head.

Reads top to bottom (nanoGPT style). Every layer is MoE (no dense layers; shared experts only
with `num_shared_experts` > 0), as in Sigma-MoE-Tiny. The forward returns per-token CE (no
reduction) so the Rho-1 selection can pick tokens after the fact without a second forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sigma_moe_kernels as K
from sigma_moe.model.attention import Attention, RMSNorm, rope_cache
from sigma_moe.model.checkpoint_io import read_model_checkpoint
from sigma_moe.model.config import SigmaMoEConfig
from sigma_moe.model.moe import MoEStats, SigmaMoELayer


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, S, V]
    loss_per_token: torch.Tensor | None  # [B, S] fp32 CE, 0 where labels == -100
    aux_losses: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # lb_loss, z_loss (coeff applied)
    moe_stats: list[MoEStats] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: SigmaMoEConfig, layer_idx: int, ep_rank: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.moe = SigmaMoELayer(cfg, layer_idx, ep_rank)

    def forward(self, x_BSD, rope, attn_mask):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope, attn_mask)
        y_BSD, stats = self.moe(self.moe_norm(x_BSD))
        return x_BSD + y_BSD, stats


class SigmaMoEForCausalLM(nn.Module):
    def __init__(self, config: SigmaMoEConfig, ep_rank: int = 0):
        """`ep_rank`: this process's rank in its expert-parallel group; it holds experts
        [ep_rank·E/ep_size, (ep_rank+1)·E/ep_size)."""
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, ep_rank) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        # Experts initialise themselves (per-expert generators, EP-invariant); the rest here.
        std = self.config.init_std
        for blk in self.layers:
            for p in (*blk.attn.parameters(), blk.moe.router.weight):
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, std)
            # GPT-2 residual scaling: output projections shrink with depth so the residual
            # stream's variance does not grow with the number of layers.
            nn.init.normal_(blk.attn.o_proj.weight, 0.0, std / (2 * self.config.num_layers) ** 0.5)
        nn.init.normal_(self.embed.weight, 0.0, std)
        nn.init.normal_(self.lm_head.weight, 0.0, std)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SigmaMoEForCausalLM:
        """The trained model of a checkpoint on CPU, in eval mode, fp32: `path` is a run's
        `checkpoints/` folder (its newest complete checkpoint) or one checkpoint folder; any
        ZeRO stage or EP size (every expert gathered, EP=1 layout); top-k per layer as at
        the saved step. Reads only the checkpoint (no DeepSpeed, no run config)."""
        config, state, _meta = read_model_checkpoint(path)
        return cls.from_state_dict(config, state, path)

    @classmethod
    def from_state_dict(
        cls, config: SigmaMoEConfig, state: dict[str, torch.Tensor], source: str | Path
    ) -> SigmaMoEForCausalLM:
        """A model of `config` holding `state` (a checkpoint's full state dict, as
        `read_model_checkpoint` gives; `source` names it in the error), fp32, eval mode."""
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {source} does not fit its recorded model config: {e}"
            ) from e
        return model.float().eval()

    # ------------------------------------------------------------------ routing schedule

    def set_topk(self, topk_per_layer: list[int]) -> None:
        if len(topk_per_layer) != len(self.layers):
            raise ValueError(
                f"set_topk: {len(topk_per_layer)} values for {len(self.layers)} layers"
            )
        for blk, k in zip(self.layers, topk_per_layer):
            if not 1 <= k <= self.config.num_experts:
                raise ValueError(f"set_topk: top-k {k} not in [1, {self.config.num_experts}]")
            blk.moe.topk = int(k)

    def current_topk(self) -> list[int]:
        return [blk.moe.topk for blk in self.layers]

    def set_dp_group(self, group) -> None:
        """Data-parallel group over which the global-batch balance loss sums expert counts."""
        for blk in self.layers:
            blk.moe.dp_group = group

    def end_step_balance(self, counts_LE: torch.Tensor, update_bias: bool = True) -> torch.Tensor:
        """After an optimizer step: `counts_LE` (this rank's tokens per expert, summed over the
        step's micro-batches) summed over the data-parallel group (the same group as the
        global-batch loss), then each layer's aux-loss-free bias updated from those global
        counts (when `update_bias` and the model has one). Returns the global counts."""
        group = self.layers[0].moe.dp_group
        counts_LE = counts_LE.detach().clone()
        if group is not None and dist.is_initialized():
            dist.all_reduce(counts_LE, group=group)
        if update_bias:
            for blk, c_E in zip(self.layers, counts_LE):
                blk.moe.update_router_bias(c_E)
        return counts_LE

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attn_mask_BSS: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        B, S = input_ids.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len {self.config.max_seq_len}")
        x_BSD = self.embed(input_ids)
        rope = rope_cache(S, self.config.head_dim, self.config.rope_theta, input_ids.device)
        all_stats: list[MoEStats] = []
        for blk in self.layers:
            if self.config.activation_checkpointing and self.training:
                x_BSD, stats = checkpoint(blk, x_BSD, rope, attn_mask_BSS, use_reentrant=False)
            else:
                x_BSD, stats = blk(x_BSD, rope, attn_mask_BSS)
            all_stats.append(stats)
        h_BSD = self.norm(x_BSD)
        logits_BSV = self.lm_head(h_BSD) if (return_logits or labels is None) else None
        loss_BS = None
        if labels is not None and logits_BSV is None:
            # fp32 CE (bf16 logits over an 8k-150k vocab lose the small probabilities Rho-1's
            # excess-loss ranking depends on), chunked so the [T, V] logits never exist whole.
            loss_BS = K.linear_cross_entropy(
                h_BSD.reshape(B * S, -1), self.lm_head.weight, labels.reshape(-1)
            ).view(B, S)
        elif labels is not None:
            loss_BS = F.cross_entropy(
                logits_BSV.float().view(B * S, -1),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(B, S)
        # Megatron-core's meaning of the coefficients: each layer's loss times the coefficient,
        # summed over layers (not averaged; tests/model/test_balancing.py pins it).
        aux = {
            "lb_loss": self.config.lb_coeff * torch.stack([s.lb_loss for s in all_stats]).sum(),
            "z_loss": self.config.z_loss_coeff * torch.stack([s.z_loss for s in all_stats]).sum(),
        }
        return CausalLMOutput(
            logits=logits_BSV,
            loss_per_token=loss_BS,
            aux_losses=aux,
            moe_stats=all_stats,
        )

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return self.config.num_params()

    def estimate_mfu(self, tokens_per_s: float, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation against `peak_flops` (FLOP/s of the hardware)."""
        return tokens_per_s * self.config.flops_per_token(seq_len, self.current_topk()) / peak_flops

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 50,
        eod: int | None = None,
    ) -> torch.Tensor:
        for _ in range(max_new_tokens):
            ctx = input_ids[:, -self.config.max_seq_len :]
            logits = self(ctx).logits[:, -1, :].float() / max(temperature, 1e-5)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
            input_ids = torch.cat([input_ids, nxt], dim=1)
            if eod is not None and bool((nxt == eod).all()):
                break
        return input_ids
