"""Model architecture config and presets (Sigma-MoE-Tiny, arXiv 2512.16248)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
    lb_loss_type: str = "global_batch"  # global_batch | micro_batch | none
    lb_coeff: float = 0.01
    z_loss_coeff: float = 1e-3
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
            raise ValueError(f"model config '{key}': {msg}")

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
            bad("ep_size", f"{self.ep_size} does not divide num_experts={self.num_experts}")
        if self.lb_loss_type not in ("global_batch", "micro_batch", "none"):
            bad("lb_loss_type", f"unknown {self.lb_loss_type!r}")

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
        # attention + router + the two pre-norms
        return self._attn_params() + self.hidden_size * self.num_experts + 2 * self.hidden_size

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
