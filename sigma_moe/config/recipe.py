"""``RunConfig``: the whole recipe (one section per component) and the checks that span
sections. Everything a run refuses about its config it refuses here, at load time, naming the
dotted key; what depends on the process count is checked by ``check_world`` the moment that
count is known (before anything is built)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sigma_moe.config.base import check
from sigma_moe.config.model import ModelConfig
from sigma_moe.config.sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    Rho1Config,
    TrainConfig,
)
from sigma_moe.data.tokenizer import BUNDLED_VOCAB_SIZE
from sigma_moe.model.config import SigmaMoEConfig

# The dotted key of each SigmaMoEConfig field that another section than `model` sets.
MODEL_FIELD_KEYS = {
    "ep_size": "parallel.ep_size",
    "activation_checkpointing": "train.activation_checkpointing",
    "init_seed": "train.seed",
    "max_seq_len": "data.seq_len",
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
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
        # Every check the model runs when it is built (heads vs KV heads, even head_dim,
        # ep_size vs num_experts, ...), now. Only model.vocab_size vs the tokenizer needs the
        # tokenizer: known here for the bundled one; another is checked when it is loaded.
        bundled = self.data.tokenizer == "bundled"
        self.build_model(BUNDLED_VOCAB_SIZE if bundled else self.model.vocab_size or 1)
        self._check_batch()
        return self

    def build_model(self, vocab_size: int) -> SigmaMoEConfig:
        """The ``SigmaMoEConfig`` of this run for a tokenizer of ``vocab_size`` tokens (the model
        section plus what the other sections decide: EP size, activation checkpointing, the
        init seed, the sequence length)."""
        return self.model.build(
            vocab_size,
            ep_size=self.parallel.ep_size,
            activation_checkpointing=self.train.activation_checkpointing,
            init_seed=self.train.seed,
            seq_len=self.data.seq_len,
            keys=MODEL_FIELD_KEYS,
        )

    def check_world(self, world_size: int) -> int:
        """The checks that need the process count; returns the gradient-accumulation steps
        (derived, never configured: the same recipe trains the same global batch on any number
        of processes)."""
        ep = self.parallel.ep_size
        check(
            ep <= world_size and world_size % ep == 0,
            "parallel.ep_size",
            f"{ep} must divide the number of processes ({world_size})",
        )
        tr = self.train
        per_round = tr.micro_batch_size * world_size
        check(
            tr.global_batch_size % per_round == 0,
            "train.global_batch_size",
            f"{tr.global_batch_size} is not divisible by micro_batch_size "
            f"({tr.micro_batch_size}) x data-parallel size ({world_size})",
        )
        return tr.global_batch_size // per_round

    def _check_batch(self) -> None:
        """Every run has a multiple of parallel.ep_size processes, each taking whole
        micro-batches of the global batch."""
        tr, ep = self.train, self.parallel.ep_size
        check(
            tr.global_batch_size % (tr.micro_batch_size * ep) == 0,
            "train.global_batch_size",
            f"{tr.global_batch_size} is not a multiple of micro_batch_size "
            f"({tr.micro_batch_size}) x parallel.ep_size ({ep}): a run has a multiple of "
            "ep_size processes, each taking whole micro-batches",
        )

    def _check_mixing(self) -> None:
        """Cross-section checks of data.mixing (the reference lives in rho1)."""
        kind = self.data.mixing.kind
        if kind == "online-doremi":
            check(
                self.rho1.reference is not None,
                "rho1.reference",
                "data.mixing.kind=online-doremi needs a reference model (its per-token losses "
                "give the excess loss); set rho1.reference to a checkpoint folder",
            )
        if kind != "static" and (kind == "online-doremi" or self.rho1.mode != "none"):
            # A prefilled store is scored offline in the static blend's global order, which an
            # online mixer does not have; the side process scores the mixer's plan instead
            # (sigma_moe/run_mixing.py, docs/mixing.md).
            check(
                self.rho1.scorer != "prefilled",
                "rho1.scorer",
                f"'prefilled' cannot serve data.mixing.kind={kind!r} (a prefilled store follows "
                "the static blend order); use rho1.scorer=process or inline",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
