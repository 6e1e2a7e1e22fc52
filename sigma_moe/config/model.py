"""The ``model`` section of a run config and what it builds: a ``SigmaMoEConfig``.

``ModelConfig`` names a preset of ``sigma_moe.model.config.PRESETS`` and overrides some of its
fields; ``build`` resolves them into the architecture the model is constructed from. The values
it needs from other sections (the EP size, the seed, ...) are passed in by
``RunConfig.build_model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sigma_moe.config.base import ConfigError, check
from sigma_moe.model.config import PRESETS, ModelConfigError, SigmaMoEConfig

# The model's vocabulary follows the tokenizer, padded to a multiple of this for GEMM shapes.
VOCAB_MULTIPLE = 64
# Preset fields a recipe may override with a positive integer.
SIZE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "moe_ffn_size",
)


@dataclass
class TopkPhase:
    """Progressive sparsification: `layers` use `topk` until `until_step` (exclusive)."""

    until_step: int = 0
    layers: list[int] = field(default_factory=list)
    topk: int = 1

    def validate(self, key: str, num_layers: int, num_experts: int) -> None:
        check(self.until_step > 0, f"{key}.until_step", f"must be > 0, got {self.until_step}")
        check(
            1 <= self.topk <= num_experts,
            f"{key}.topk",
            f"must be in [1, {num_experts}] (the model's num_experts), got {self.topk}",
        )
        check(len(self.layers) > 0, f"{key}.layers", "must list at least one layer")
        bad = [li for li in self.layers if not 0 <= li < num_layers]
        check(not bad, f"{key}.layers", f"layers {bad} not in [0, {num_layers})")


@dataclass
class ModelConfig:
    preset: str = "demo-cpu"
    # Overrides of the preset (None keeps the preset's value).
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    num_experts: int | None = None
    moe_ffn_size: int | None = None
    router_topk: int | list[int] | None = None
    topk_schedule: list[TopkPhase] = field(default_factory=list)
    # Balance loss N_E·Σ f_i·p_i per layer: f over the data-parallel group's tokens
    # (global_batch), this micro-batch's (micro_batch) or each sequence's (sequence).
    lb_loss_type: Literal["global_batch", "micro_batch", "sequence", "none"] = "global_batch"
    # Megatron-core's meaning (since 2026-12): each layer's loss is multiplied by the coefficient
    # and the layers' terms are SUMMED. Before, the coefficient scaled the MEAN over layers, so a
    # recipe written for that divides its values by num_layers (configs/ did: demo-cpu 0.01 ->
    # 0.0025 at 4 layers, so its behaviour is unchanged).
    lb_coeff: float = 0.01
    z_loss_coeff: float = 1.0e-3
    # DeepSeek-V3 aux-loss-free balancing: a per-expert bias on the router probabilities for the
    # top-k choice only (gates unchanged), after each step += rate · sign(mean load − load) from
    # the global batch's counts. Combine with lb_loss_type: none (pure) or a small sequence loss.
    router_bias_update: Literal["none", "aux_free"] = "none"
    bias_update_rate: float = 1.0e-3
    # Resuming a checkpoint saved without a router bias into a run with one is refused unless
    # this is true (the bias then starts at zero).
    router_bias_start_zero: bool = False
    # Always-on SwiGLU experts of moe_ffn_size added to the routed output (data-parallel).
    num_shared_experts: int = 0
    capacity_factor: float | None = None
    kernel_backend: Literal["auto", "torch", "triton", "interpret"] = "auto"
    # Preset overrides a model imported from transformers may need (`sigma-moe import-hf` writes
    # them into its config.yaml); null keeps the preset's value.
    tie_embeddings: bool | None = None
    rope_theta: float | None = None
    rms_eps: float | None = None
    # Embedding rows; null: the tokenizer's vocabulary rounded up to a multiple of 64.
    vocab_size: int | None = None

    def resolved(self, name: str) -> Any:
        """The value the model gets for ``name``: the override, else the preset's, else
        SigmaMoEConfig's default."""
        v = getattr(self, name)
        if v is not None:
            return v
        return PRESETS[self.preset].get(name, getattr(SigmaMoEConfig, name))

    def validate(self, key: str = "model") -> None:
        check(
            self.preset in PRESETS,
            f"{key}.preset",
            f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}",
        )
        for name in SIZE_FIELDS:
            v = getattr(self, name)
            check(v is None or v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        check(self.lb_coeff >= 0, f"{key}.lb_coeff", f"must be >= 0, got {self.lb_coeff}")
        check(
            self.z_loss_coeff >= 0, f"{key}.z_loss_coeff", f"must be >= 0, got {self.z_loss_coeff}"
        )
        check(
            self.bias_update_rate >= 0,
            f"{key}.bias_update_rate",
            f"must be >= 0, got {self.bias_update_rate}",
        )
        check(
            self.num_shared_experts >= 0,
            f"{key}.num_shared_experts",
            f"must be >= 0, got {self.num_shared_experts}",
        )
        check(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"{key}.capacity_factor",
            f"must be > 0 or null (dropless), got {self.capacity_factor}",
        )
        for name in ("rope_theta", "rms_eps", "vocab_size"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{key}.{name}", f"must be > 0 or null, got {v}")
        self._validate_topk(key)

    def _validate_topk(self, key: str) -> None:
        """router_topk and topk_schedule against the resolved layers and experts (the model
        would only check them when it is built or at the phase's first step)."""
        n_layers, n_experts = self.resolved("num_layers"), self.resolved("num_experts")
        topks = self.router_topk if isinstance(self.router_topk, list) else [self.router_topk]
        for v in topks:
            check(
                v is None or 1 <= v <= n_experts,
                f"{key}.router_topk",
                f"top-k {v} must be in [1, {n_experts}] (the model's num_experts)",
            )
        if isinstance(self.router_topk, list):
            check(
                len(self.router_topk) == n_layers,
                f"{key}.router_topk",
                f"{len(self.router_topk)} entries for {n_layers} layers (give one per layer "
                "or a single int)",
            )
        for i, ph in enumerate(self.topk_schedule):
            ph.validate(f"{key}.topk_schedule[{i}]", n_layers, n_experts)

    def padded_vocab(self, tokenizer_vocab: int, key: str = "model.vocab_size") -> int:
        """Embedding rows for a tokenizer of ``tokenizer_vocab`` tokens."""
        if self.vocab_size is None:
            return int(math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
        # e.g. an imported model whose embedding has spare rows
        check(
            self.vocab_size >= tokenizer_vocab,
            key,
            f"{self.vocab_size} rows for a tokenizer of {tokenizer_vocab} tokens",
        )
        return self.vocab_size

    def build(
        self,
        vocab_size: int,
        *,
        ep_size: int,
        activation_checkpointing: bool,
        init_seed: int,
        seq_len: int,
        key: str = "model",
        keys: dict[str, str] | None = None,
    ) -> SigmaMoEConfig:
        """The architecture for a tokenizer of ``vocab_size`` tokens; the other arguments come
        from the run's other sections (``RunConfig.build_model`` passes them, with ``keys``:
        the dotted key of each, e.g. ``{"ep_size": "parallel.ep_size"}``). A field the model
        refuses raises ``ConfigError`` naming its dotted key (``<key>.<field>`` by default)."""
        names = (*SIZE_FIELDS, "router_topk", "tie_embeddings", "rope_theta", "rms_eps")
        try:
            return SigmaMoEConfig.preset(
                self.preset,
                **{n: getattr(self, n) for n in names},
                vocab_size=self.padded_vocab(vocab_size, f"{key}.vocab_size"),
                lb_loss_type=self.lb_loss_type,
                router_bias_update=self.router_bias_update,
                bias_update_rate=self.bias_update_rate,
                num_shared_experts=self.num_shared_experts,
                lb_coeff=self.lb_coeff,
                z_loss_coeff=self.z_loss_coeff,
                capacity_factor=self.capacity_factor,
                kernel_backend=self.kernel_backend,
                ep_size=ep_size,
                activation_checkpointing=activation_checkpointing,
                init_seed=init_seed,
                max_seq_len=max(seq_len, PRESETS[self.preset].get("max_seq_len", 0)),
            )
        except ModelConfigError as e:
            dotted = (keys or {}).get(e.field, f"{key}.{e.field}")
            raise ConfigError(f"config key '{dotted}': {e.msg}") from e
