"""Run configuration: one dataclass per component, each with `validate()`.

YAML only sets values. Every key is checked against the dataclass field it names (type and
range); unknown keys and bad values raise `ValueError` naming the full dotted key, so a typo in a
recipe or a `--set` override never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


# --------------------------------------------------------------------------- sections


@dataclass
class TopkPhase:
    """Progressive sparsification: `layers` use `topk` until `until_step` (exclusive)."""

    until_step: int = 0
    layers: list[int] = field(default_factory=list)
    topk: int = 1

    def validate(self, key: str, num_layers: int, num_experts: int) -> None:
        _check(self.until_step > 0, f"{key}.until_step", f"must be > 0, got {self.until_step}")
        _check(
            1 <= self.topk <= num_experts,
            f"{key}.topk",
            f"must be in [1, {num_experts}] (the model's num_experts), got {self.topk}",
        )
        _check(len(self.layers) > 0, f"{key}.layers", "must list at least one layer")
        bad = [li for li in self.layers if not 0 <= li < num_layers]
        _check(not bad, f"{key}.layers", f"layers {bad} not in [0, {num_layers})")


@dataclass
class ModelSection:
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

    def validate(self, key: str = "model") -> None:
        from sigma_moe.model.config import PRESETS, SigmaMoEConfig

        _check(
            self.preset in PRESETS,
            f"{key}.preset",
            f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}",
        )
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "moe_ffn_size",
        ):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        topks = self.router_topk if isinstance(self.router_topk, list) else [self.router_topk]
        for v in topks:
            _check(
                v is None or v >= 1, f"{key}.router_topk", f"must be >= 1, got {self.router_topk}"
            )
        _check(self.lb_coeff >= 0, f"{key}.lb_coeff", f"must be >= 0, got {self.lb_coeff}")
        _check(
            self.z_loss_coeff >= 0, f"{key}.z_loss_coeff", f"must be >= 0, got {self.z_loss_coeff}"
        )
        _check(
            self.bias_update_rate >= 0,
            f"{key}.bias_update_rate",
            f"must be >= 0, got {self.bias_update_rate}",
        )
        _check(
            self.num_shared_experts >= 0,
            f"{key}.num_shared_experts",
            f"must be >= 0, got {self.num_shared_experts}",
        )
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"{key}.capacity_factor",
            f"must be > 0 or null (dropless), got {self.capacity_factor}",
        )
        for name in ("rope_theta", "rms_eps", "vocab_size"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{key}.{name}", f"must be > 0 or null, got {v}")
        # Bounds the model would only check at its first step (after start-up, issue 15).
        preset = PRESETS[self.preset]
        n_layers = self.num_layers or preset.get("num_layers", SigmaMoEConfig.num_layers)
        n_experts = self.num_experts or preset.get("num_experts", SigmaMoEConfig.num_experts)
        for v in topks:
            _check(
                v is None or v <= n_experts,
                f"{key}.router_topk",
                f"top-k {v} is more than the model's {n_experts} experts",
            )
        for i, ph in enumerate(self.topk_schedule):
            ph.validate(f"{key}.topk_schedule[{i}]", n_layers, n_experts)


@dataclass
class DomainConfig:
    name: str = ""
    # A prefix written by `sigma-moe prepare-data`, or "bundled" for the bundled corpus domain.
    path: str = "bundled"
    weight: float = 1.0
    clean: bool = False

    def validate(self, key: str) -> None:
        _check(bool(self.name), f"{key}.name", "must be a non-empty string")
        _check(
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
        _check(
            self.update_every >= 1, f"{key}.update_every", f"must be >= 1, got {self.update_every}"
        )
        _check(
            math.isfinite(self.floor) and 0 <= self.floor * num_domains <= 1,
            f"{key}.floor",
            f"{self.floor} × {num_domains} domains must be in [0, 1] (the weights would be "
            "infeasible)",
        )
        _check(self.doremi_lr > 0, f"{key}.doremi_lr", f"must be > 0, got {self.doremi_lr}")
        _check(
            0 <= self.doremi_smoothing <= 1,
            f"{key}.doremi_smoothing",
            f"must be in [0, 1], got {self.doremi_smoothing}",
        )
        _check(
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
        _check(self.seq_len >= 2, f"{key}.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(len(self.domains) > 0, f"{key}.domains", "must list at least one domain")
        names = [d.name for d in self.domains]
        _check(
            len(set(names)) == len(names), f"{key}.domains", f"duplicate domain names in {names}"
        )
        for i, d in enumerate(self.domains):
            d.validate(f"{key}.domains[{i}]")
        _check(sum(d.weight for d in self.domains) > 0, f"{key}.domains", "weights sum to 0")
        self.mixing.validate(f"{key}.mixing", len(self.domains))
        _check(self.val_samples_per_domain >= 1, f"{key}.val_samples_per_domain", "must be >= 1")


@dataclass
class Rho1Config:
    mode: Literal["none", "excess", "reference"] = "none"
    select_ratio: float = 0.6
    threshold_scope: Literal["rank", "global"] = "rank"
    unselected_weight: float = 0.0
    # A checkpoint folder of ours or a transformers model folder with the same tokenizer.
    reference: str | None = None
    # Reference-loss store folder; default: <run_dir>/ref_store.
    store: str | None = None
    scorer: Literal["process", "inline", "prefilled"] = "process"
    scorer_lookahead: int = 64
    scorer_batch_size: int = 8
    scorer_max_restarts: int = 3
    scorer_timeout_s: float = 300.0

    def validate(self, key: str = "rho1") -> None:
        _check(
            0 < self.select_ratio <= 1,
            f"{key}.select_ratio",
            f"must be in (0, 1], got {self.select_ratio}",
        )
        _check(
            0 <= self.unselected_weight <= 1,
            f"{key}.unselected_weight",
            f"must be in [0, 1], got {self.unselected_weight}",
        )
        if self.mode != "none":
            _check(
                self.reference is not None,
                f"{key}.reference",
                f"rho1.mode={self.mode!r} needs a reference model folder",
            )
        _check(self.scorer_lookahead >= 1, f"{key}.scorer_lookahead", "must be >= 1")
        _check(self.scorer_batch_size >= 1, f"{key}.scorer_batch_size", "must be >= 1")
        _check(self.scorer_max_restarts >= 0, f"{key}.scorer_max_restarts", "must be >= 0")
        _check(self.scorer_timeout_s > 0, f"{key}.scorer_timeout_s", "must be > 0")


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
            _check(
                getattr(self, name) >= 1,
                f"{key}.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(0 < self.decay_fraction <= 1, f"{key}.decay_fraction", "must be in (0, 1]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"{key}.{name}", f"must be in [0, 1) (AdamW), got {v}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.nan_max_skips >= 0, f"{key}.nan_max_skips", "must be >= 0")
        _check(
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
        _check(self.ep_size >= 1, f"{key}.ep_size", f"must be >= 1, got {self.ep_size}")
        _check(
            self.zero_stage in (0, 1, 2),
            f"{key}.zero_stage",
            f"must be 0, 1 or 2 (ZeRO-3 does not shard our stacked experts), got {self.zero_stage}",
        )


@dataclass
class CheckpointConfig:
    every: int = 100
    keep_last: int = 3

    def validate(self, key: str = "checkpoint") -> None:
        _check(self.every >= 1, f"{key}.every", f"must be >= 1, got {self.every}")
        _check(self.keep_last >= 1, f"{key}.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "sigma-moe"
    progress: bool = True

    def validate(self, key: str = "logging") -> None:
        pass


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    rho1: Rho1Config = field(default_factory=Rho1Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        self._check_mixing()
        return self

    def _check_mixing(self) -> None:
        """Cross-section checks of data.mixing (the reference lives in rho1)."""
        kind = self.data.mixing.kind
        if kind == "online-doremi":
            _check(
                self.rho1.reference is not None,
                "rho1.reference",
                "data.mixing.kind=online-doremi needs a reference model (its per-token losses "
                "give the excess loss); set rho1.reference to a checkpoint folder",
            )
        if kind != "static" and self.rho1.mode != "none":
            # The side process scores ahead in the static blend's global order, which an online
            # mixer does not have (see docs/mixing.md).
            _check(
                self.rho1.scorer == "inline",
                "rho1.scorer",
                f"{self.rho1.scorer!r} cannot serve data.mixing.kind={kind!r} (it scores ahead "
                "in the static blend order); use rho1.scorer=inline",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the field type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        # `.inf` / `.nan` are YAML numbers; no key of ours means anything with them (issue 15:
        # train.lr=.inf trained into NaN weights).
        _check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"config key '{'.'.join(parts[: i + 1])}' is not a section; cannot set '{dotted}'"
            )
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=v` strings → (key, YAML-parsed value); lists like `[1, 4]` work."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. train.max_steps=50)"
            )
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as e:
            raise ConfigError(f"config key '{k}': value {v!r} is not valid YAML ({e})") from e
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if tree is None:  # an empty file would silently run the built-in defaults (300 steps)
            raise ConfigError(
                f"config file {p} is empty: give at least one key (e.g. copy configs/demo-cpu.yaml)"
            )
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(tree, k, v)
    return _from_dict(RunConfig, tree, "").validate()


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, tree, "").validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
