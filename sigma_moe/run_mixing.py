"""Run assembly for domain mixing: ``data.mixing.kind`` picks the sampler.

``run_training(cfg, out_dir, …)`` is what ``sigma_moe.run.run_training`` (``sigma-moe train``)
calls: the static kind goes straight to ``sigma_moe.train.loop.run_training`` (megatron's blend,
unchanged); an online kind passes a data policy that builds one stream per domain
(``build_domain_streams``), the mixer (``sigma_moe.mixing.online.build_sampler``), and — for
online-doremi without Rho-1 selection — the reference scorer that puts ``ref_loss`` into every
batch. With Rho-1 selection on, its objective already does that (the same store and scorer), so
the mixer reads the excess loss of the same reference.

This module sits in the run-assembly layer (beside ``sigma_moe.run``) because it joins the two
data policies: ``sigma_moe.mixing`` and ``sigma_moe.rho1`` never import each other.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sigma_moe.config import Rho1Config, RunConfig
from sigma_moe.data.dataset import build_training_data
from sigma_moe.mixing.online import OnlineSampler, build_sampler
from sigma_moe.rho1.reference import check_reference_tokenizer
from sigma_moe.rho1.scorer import ScorerSupervisor, resolve_mode
from sigma_moe.train import loop
from sigma_moe.train.hooks import Callback, Objective
from sigma_moe.train.sampling import Sampler


class ScorerPlan(Callback):
    """Tells a Rho-1 scorer side process which samples the online mixer reads next.

    An online mixer's samples have no global order for the side process to score ahead in
    (``rho1.scorer: process``); after every step (its weights updated) this publishes the keys
    of the next ``global_batch_size + rho1.scorer_lookahead`` slots (``upcoming_keys``: exact
    until the weights next change). A wait for keys the plan missed puts them first
    (``ScorerSupervisor.plan``), so a stale plan costs time, never correctness.
    """

    def __init__(
        self, get_supervisor: Callable[[], ScorerSupervisor | None], global_batch_size: int
    ):
        self.get_supervisor, self.global_batch_size = get_supervisor, global_batch_size

    def _publish(self, trainer) -> None:
        sup = self.get_supervisor()
        if sup is not None and isinstance(trainer.sampler, OnlineSampler):
            n = self.global_batch_size + sup.lookahead
            sup.plan(trainer.sampler.upcoming_keys(n))

    def on_train_start(self, trainer) -> None:
        self._publish(trainer)

    def on_step_end(self, trainer, metrics) -> None:
        self._publish(trainer)


class DoReMiReference(Callback):
    """Callback (online-doremi with rho1.mode=none): per-token reference losses for every batch
    from the Rho-1 scorer (``rho1.scorer``: inline, or its side process fed by ``ScorerPlan``),
    into the run's reference-loss store. `rho1`: the `rho1` section; `run_config` only travels,
    unread here, to the scorer (its side process rebuilds the training data)."""

    def __init__(self, rho1: Rho1Config, out_dir: Path, *, run_config: RunConfig):
        self.rho1, self.out_dir, self.run_config = rho1, Path(out_dir), run_config
        self.sup: ScorerSupervisor | None = None

    def on_train_start(self, trainer) -> None:
        store = self.out_dir / "ref_store"
        if trainer.dp > 1:  # the scorers of several ranks must not share one store
            store = self.out_dir / f"ref_store.rank{trainer.world.rank}"
        mode = resolve_mode(self.rho1.scorer)
        inline = mode == "inline"
        self.sup = ScorerSupervisor(
            self.run_config,
            store,
            dataset=trainer.train_ds,
            mode=mode,
            num_threads=int(os.environ.get("SIGMA_MOE_SCORER_THREADS", "1")),
            # inline: the trainer's own device; side process: the node's first GPU (or CPU)
            device=str(trainer.world.device) if inline else None,
        ).start()

    def on_batches(self, trainer, batches) -> None:
        for b in batches:
            keys = list(zip(b["domain"].tolist(), b["sample_index"].tolist()))
            b["ref_loss"] = self.sup.wait_for(keys).to(trainer.world.device)

    def on_train_end(self, trainer, last) -> None:
        if self.sup is not None:
            self.sup.close()
            self.sup = None


def online_data_policy(
    cfg: RunConfig,
    tokenizer: Any,
    num_samples: int,
    *,
    out_dir: Path,
    objective: Objective | None = None,
) -> tuple[Any, Sampler, list]:
    """``loop.DataPolicy`` of an online mixer; every check runs before the model is built."""
    if cfg.data.mixing.kind == "online-doremi":
        check_reference_tokenizer(cfg.rho1.reference, tokenizer)
    # An online kind: one stream of num_samples per domain (any domain may be read by all).
    ds = build_training_data(cfg.data, num_samples, cfg.train.seed, tokenizer)
    sampler = build_sampler(cfg, ds.domain_names)
    callbacks: list[Callback] = []
    G = cfg.train.global_batch_size
    if cfg.data.mixing.kind == "online-doremi" and cfg.rho1.mode == "none":
        ref = DoReMiReference(cfg.rho1, out_dir, run_config=cfg)
        callbacks += [ref, ScorerPlan(lambda: ref.sup, G)]
    elif cfg.rho1.mode != "none" and objective is not None:
        # the Rho-1 objective's scorer (the same store and side process DoReMi reads)
        callbacks.append(ScorerPlan(lambda: getattr(objective, "sup", None), G))
    return ds, sampler, callbacks


def run_training(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: str = "none",
    extra_callbacks: list | None = None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """``sigma_moe.train.loop.run_training`` with the sampler ``data.mixing.kind`` names."""
    if cfg.data.mixing.kind == "static":
        return loop.run_training(cfg, out_dir, resume, extra_callbacks, objective=objective)
    policy = functools.partial(online_data_policy, out_dir=Path(out_dir), objective=objective)
    return loop.run_training(
        cfg, out_dir, resume, extra_callbacks, data_policy=policy, objective=objective
    )
