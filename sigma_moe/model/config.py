"""Model architecture config and presets (Sigma-MoE-Tiny, arXiv 2512.16248)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LB_LOSS_TYPES = ("global_batch", "micro_batch", "sequence", "none")
ROUTER_BIAS_UPDATES = ("none", "aux_free")


class ModelConfigError(ValueError):
    """A SigmaMoEConfig field that cannot build a model; ``field`` names it (the run config maps
    it to its dotted key, e.g. ``ep_size`` -> ``parallel.ep_size``)."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"model config '{field}': {msg}")
        self.field, self.msg = field, msg


@dataclass
class SigmaMoEConfig:
    vocab_size: int = 8192
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    moe_ffn_size: int = 128
    # One entry per layer after __post_init__ (an int is broadcast).
    router_topk: int | list[int] = 1
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_seq_len: int = 4096
    lb_loss_type: str = "global_batch"  # global_batch | micro_batch | sequence | none
    # Megatron-core's meaning: each layer's balance / z loss is multiplied by its coefficient and
    # the layers' terms are SUMMED (until 2026-12 we took the mean over layers: a factor of
    # num_layers apart; tests/model/test_balancing.py pins the sum).
    lb_coeff: float = 0.01
    z_loss_coeff: float = 1e-3
    # DeepSeek-V3 aux-loss-free balancing: a per-expert bias added to the router probabilities
    # for the top-k choice only, updated after each step by rate · sign(mean load − load).
    router_bias_update: str = "none"  # none | aux_free
    bias_update_rate: float = 1e-3
    # Always-on SwiGLU experts of moe_ffn_size added to the routed output (DeepSeek/Qwen style);
    # 0 = Sigma-MoE-Tiny. Dense (data-parallel) parameters, never sharded over EP ranks.
    num_shared_experts: int = 0
    capacity_factor: float | None = None  # None: dropless
    kernel_backend: str = "auto"
    ep_size: int = 1
    activation_checkpointing: bool = False
    init_std: float = 0.02
    init_seed: int = 1234  # seeds the per-expert generators (EP-invariant init)

    def __post_init__(self) -> None:
        if isinstance(self.router_topk, int):
            self.router_topk = [self.router_topk] * self.num_layers
        self.validate()

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ModelConfigError(key, msg)

        if len(self.router_topk) != self.num_layers:
            bad("router_topk", f"has {len(self.router_topk)} entries for {self.num_layers} layers")
        for k in self.router_topk:
            if not 1 <= k <= self.num_experts:
                bad("router_topk", f"top-k {k} must be in [1, num_experts={self.num_experts}]")
        if self.num_attention_heads % self.num_kv_heads:
            bad(
                "num_kv_heads",
                f"{self.num_kv_heads} does not divide {self.num_attention_heads} query heads",
            )
        if self.head_dim % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.num_experts % self.ep_size:
            shared = (
                f" (num_experts counts the routed experts only; the {self.num_shared_experts} "
                "shared experts are data-parallel and never split over EP ranks)"
                if self.num_shared_experts
                else ""
            )
            bad("ep_size", f"{self.ep_size} does not divide num_experts={self.num_experts}{shared}")
        if self.lb_loss_type not in LB_LOSS_TYPES:
            bad("lb_loss_type", f"unknown {self.lb_loss_type!r}; known: {list(LB_LOSS_TYPES)}")
        if self.router_bias_update not in ROUTER_BIAS_UPDATES:
            bad(
                "router_bias_update",
                f"unknown {self.router_bias_update!r}; known: {list(ROUTER_BIAS_UPDATES)}",
            )
        if not self.bias_update_rate >= 0:
            bad("bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")
        if self.num_shared_experts < 0:
            bad("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SigmaMoEConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def replace(self, **kw: Any) -> SigmaMoEConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ sizes

    def _attn_params(self) -> int:
        d, h = self.hidden_size, self.head_dim
        q = d * self.num_attention_heads * h
        kv = 2 * d * self.num_kv_heads * h
        o = self.num_attention_heads * h * d
        norms = 2 * h  # QK-norm weights
        return q + kv + o + norms

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_ffn_size

    def _layer_fixed_params(self) -> int:
        # attention + router + the two pre-norms + the always-on shared experts
        return (
            self._attn_params()
            + self.hidden_size * self.num_experts
            + 2 * self.hidden_size
            + self.num_shared_experts * self._expert_params()
        )

    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        per_layer = self._layer_fixed_params() + self.num_experts * self._expert_params()
        return emb + self.num_layers * per_layer + self.hidden_size

    def num_active_params(self, topk: list[int] | None = None) -> int:
        """Parameters touched per token, excluding embeddings and the LM head."""
        topk = topk or self.router_topk
        return (
            sum(self._layer_fixed_params() + k * self._expert_params() for k in topk)
            + self.hidden_size
        )

    def flops_per_token(self, seq_len: int, topk: list[int] | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style accounting:
        6 x active matmul params (LM head included) + 12 x layers x heads x head_dim x seq_len
        for attention scores (halved for causality is NOT applied, matching nanoGPT/PaLM)."""
        dense = self.num_active_params(topk) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * dense + attn


PRESETS: dict[str, dict[str, Any]] = {
    # Sigma-MoE-Tiny (arXiv 2512.16248): 56 layers, hidden 1536, GQA 16/4 heads of 96, 96 experts
    # of 768, top-1. The report does not publish its vocabulary; we use Qwen's 151,936.
    "sigma-moe-tiny": dict(
        vocab_size=151936,
        num_layers=56,
        hidden_size=1536,
        num_attention_heads=16,
        num_kv_heads=4,
        head_dim=96,
        num_experts=96,
        moe_ffn_size=768,
        router_topk=1,
        max_seq_len=4096,
    ),
    # Trains in minutes on a 2-core CPU: ~13M expert params, ~0.6M active per layer.
    "demo-cpu": dict(
        vocab_size=8192,
        num_layers=4,
        hidden_size=256,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=64,
        num_experts=32,
        moe_ffn_size=128,
        router_topk=1,
        max_seq_len=1024,
    ),
    # For unit tests: a forward/backward takes milliseconds.
    "test-tiny": dict(
        vocab_size=512,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        moe_ffn_size=32,
        router_topk=1,
        max_seq_len=512,
    ),
}
