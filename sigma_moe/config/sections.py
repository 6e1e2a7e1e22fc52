"""The data, Rho-1, training, parallelism, checkpoint and logging sections of a run config
(the model's is ``sigma_moe.config.model``), each with ``validate(key)`` over its own fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sigma_moe.config.base import check


@dataclass
class DomainConfig:
    name: str = ""
    # A prefix written by `sigma-moe prepare-data`, or "bundled" for the bundled corpus domain.
    path: str = "bundled"
    weight: float = 1.0
    clean: bool = False

    def validate(self, key: str) -> None:
        check(bool(self.name), f"{key}.name", "must be a non-empty string")
        check(
            math.isfinite(self.weight) and self.weight >= 0,
            f"{key}.weight",
            f"must be a finite number >= 0, got {self.weight}",
        )


@dataclass
class MixingConfig:
    """How domains are sampled (sigma_moe/mixing): the static blend of the domain weights, or an
    online mixer that starts from them and re-weights every `update_every` steps."""

    kind: Literal["static", "online-doremi", "online-bandit"] = "static"
    update_every: int = 10
    floor: float = 0.01  # every online weight stays >= floor (floor × domains <= 1)
    doremi_lr: float = 1.0  # DoReMi's step size η
    doremi_smoothing: float = 1.0e-3  # DoReMi's mixing with the uniform distribution, c
    bandit_reward: Literal["loss", "loss_decrease"] = "loss"
    bandit_alpha: float = 0.9  # Online Data Mixing's moving average of the rewards

    def validate(self, key: str, num_domains: int = 1) -> None:
        check(
            self.update_every >= 1, f"{key}.update_every", f"must be >= 1, got {self.update_every}"
        )
        check(
            math.isfinite(self.floor) and 0 <= self.floor * num_domains <= 1,
            f"{key}.floor",
            f"{self.floor} × {num_domains} domains must be in [0, 1] (the weights would be "
            "infeasible)",
        )
        check(self.doremi_lr > 0, f"{key}.doremi_lr", f"must be > 0, got {self.doremi_lr}")
        check(
            0 <= self.doremi_smoothing <= 1,
            f"{key}.doremi_smoothing",
            f"must be in [0, 1], got {self.doremi_smoothing}",
        )
        check(
            0 <= self.bandit_alpha < 1,
            f"{key}.bandit_alpha",
            f"must be in [0, 1), got {self.bandit_alpha}",
        )


def _default_domains() -> list[DomainConfig]:
    return [
        DomainConfig("prose", "bundled", 0.3, True),
        DomainConfig("code", "bundled", 0.2, True),
        DomainConfig("math", "bundled", 0.2, True),
        DomainConfig("webnoise", "bundled", 0.3, False),
    ]


@dataclass
class DataConfig:
    tokenizer: str = "bundled"
    seq_len: int = 256
    domains: list[DomainConfig] = field(default_factory=_default_domains)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    reset_at_eod: bool = False
    val_samples_per_domain: int = 32

    def validate(self, key: str = "data") -> None:
        check(self.seq_len >= 2, f"{key}.seq_len", f"must be >= 2, got {self.seq_len}")
        check(len(self.domains) > 0, f"{key}.domains", "must list at least one domain")
        names = [d.name for d in self.domains]
        check(len(set(names)) == len(names), f"{key}.domains", f"duplicate domain names in {names}")
        for i, d in enumerate(self.domains):
            d.validate(f"{key}.domains[{i}]")
        check(sum(d.weight for d in self.domains) > 0, f"{key}.domains", "weights sum to 0")
        self.mixing.validate(f"{key}.mixing", len(self.domains))
        check(self.val_samples_per_domain >= 1, f"{key}.val_samples_per_domain", "must be >= 1")


@dataclass
class Rho1Config:
    mode: Literal["none", "excess", "reference"] = "none"
    select_ratio: float = 0.6
    threshold_scope: Literal["rank", "global"] = "rank"
    unselected_weight: float = 0.0
    # A checkpoint folder of ours or a transformers model folder with the same tokenizer.
    reference: str | None = None
    # The reference's forward dtype; auto: train.precision. bf16 (the Rho-1 paper's reference
    # ran in bf16) is ~1.4x faster on CPUs with AVX-512 BF16 and on GPUs; it moves reference
    # losses by ~4e-3 on average and 0.04% of the selection (docs/rho1.md); a store remembers it.
    reference_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Reference-loss store folder; default: <run_dir>/ref_store.
    store: str | None = None
    # reference scorer: auto (inline where one trainer holds every core of a CPU-only node, else
    # a side process; docs/rho1.md), process, inline in the trainer, or a prefilled store
    scorer: Literal["auto", "process", "inline", "prefilled"] = "auto"
    scorer_lookahead: int = 64
    scorer_batch_size: int = 8
    scorer_max_restarts: int = 3
    scorer_timeout_s: float = 300.0
    # Niceness added to the scorer side process (0-19; 0: the trainer's priority).
    scorer_nice: int = 10

    def validate(self, key: str = "rho1") -> None:
        check(
            0 < self.select_ratio <= 1,
            f"{key}.select_ratio",
            f"must be in (0, 1], got {self.select_ratio}",
        )
        check(
            0 <= self.unselected_weight <= 1,
            f"{key}.unselected_weight",
            f"must be in [0, 1], got {self.unselected_weight}",
        )
        if self.mode != "none":
            check(
                self.reference is not None,
                f"{key}.reference",
                f"rho1.mode={self.mode!r} needs a reference model folder",
            )
        check(self.scorer_lookahead >= 1, f"{key}.scorer_lookahead", "must be >= 1")
        check(self.scorer_batch_size >= 1, f"{key}.scorer_batch_size", "must be >= 1")
        check(self.scorer_max_restarts >= 0, f"{key}.scorer_max_restarts", "must be >= 0")
        check(self.scorer_timeout_s > 0, f"{key}.scorer_timeout_s", "must be > 0")
        check(
            0 <= self.scorer_nice <= 19,
            f"{key}.scorer_nice",
            f"must be in [0, 19], got {self.scorer_nice}",
        )


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    eval_every: int = 100
    nan_policy: Literal["stop", "skip"] = "skip"
    nan_max_skips: int = 3
    activation_checkpointing: bool = False
    compile: bool = False

    def validate(self, key: str = "train") -> None:
        for name in (
            "max_steps",
            "micro_batch_size",
            "global_batch_size",
            "log_every",
            "eval_every",
        ):
            check(
                getattr(self, name) >= 1,
                f"{key}.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(0 < self.decay_fraction <= 1, f"{key}.decay_fraction", "must be in (0, 1]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check(0 <= v < 1, f"{key}.{name}", f"must be in [0, 1) (AdamW), got {v}")
        check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.nan_max_skips >= 0, f"{key}.nan_max_skips", "must be >= 0")
        check(
            self.global_batch_size % self.micro_batch_size == 0,
            f"{key}.global_batch_size",
            f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
        )


@dataclass
class ParallelConfig:
    ep_size: int = 1
    zero_stage: int = 1
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str = "parallel") -> None:
        check(self.ep_size >= 1, f"{key}.ep_size", f"must be >= 1, got {self.ep_size}")
        check(
            self.zero_stage in (0, 1, 2),
            f"{key}.zero_stage",
            f"must be 0, 1 or 2 (ZeRO-3 does not shard our stacked experts), got {self.zero_stage}",
        )


@dataclass
class CheckpointConfig:
    every: int = 100
    keep_last: int = 3

    def validate(self, key: str = "checkpoint") -> None:
        check(self.every >= 1, f"{key}.every", f"must be >= 1, got {self.every}")
        check(self.keep_last >= 1, f"{key}.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "sigma-moe"
    progress: bool = True

    def validate(self, key: str = "logging") -> None:
        pass
