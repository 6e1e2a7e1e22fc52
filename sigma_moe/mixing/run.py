"""Run assembly for domain mixing: ``data.mixing.kind`` picks the sampler.

``run_training(cfg, out_dir, …)`` is what ``sigma-moe train`` calls: the static kind goes
straight to ``sigma_moe.train.loop.run_training`` (megatron's blend, unchanged); an online kind
passes a data policy that builds one stream per domain (``build_domain_streams``), the mixer,
and — for online-doremi without Rho-1 selection — the reference scorer that puts ``ref_loss``
into every batch. With Rho-1 selection on, its objective already does that (the same store and
scorer), so the mixer reads the excess loss of the same reference. The Rho-1 objective itself is
built one layer up, by the run assembly ``sigma_moe.run``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sigma_moe.config import RunConfig
from sigma_moe.data.dataset import build_domain_streams
from sigma_moe.mixing.online import DoReMiSampler, Exp3Sampler
from sigma_moe.rho1.reference import check_reference_tokenizer
from sigma_moe.rho1.scorer import ScorerSupervisor
from sigma_moe.train import loop
from sigma_moe.train.hooks import Callback, Objective
from sigma_moe.train.sampling import Sampler


def build_sampler(cfg: RunConfig, domain_names: list[str]) -> Sampler:
    """The online mixer of ``cfg.data.mixing`` over ``domain_names`` (config order)."""
    m = cfg.data.mixing
    G = cfg.train.global_batch_size
    if m.kind == "online-doremi":
        return DoReMiSampler(
            domain_names,
            G,
            [d.weight for d in cfg.data.domains],
            m.update_every,
            m.floor,
            lr=m.doremi_lr,
            smoothing=m.doremi_smoothing,
        )
    if m.kind == "online-bandit":
        return Exp3Sampler(
            domain_names, G, m.update_every, m.floor, reward=m.bandit_reward, alpha=m.bandit_alpha
        )
    raise ValueError(f"config key 'data.mixing.kind': {m.kind!r} is not an online mixer")


class DoReMiReference(Callback):
    """Callback (online-doremi with rho1.mode=none): per-token reference losses for every batch
    from the Rho-1 scorer (inline, into the run's reference-loss store)."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.sup: ScorerSupervisor | None = None

    def on_train_start(self, trainer) -> None:
        store = self.out_dir / "ref_store"
        if trainer.dp > 1:  # inline scorers of several ranks must not share one store
            store = self.out_dir / f"ref_store.rank{trainer.world.rank}"
        self.sup = ScorerSupervisor(
            self.cfg,
            store,
            dataset=trainer.train_ds,
            mode="inline",
            device=str(trainer.world.device),
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
    cfg: RunConfig, tokenizer: Any, num_samples: int, *, out_dir: Path
) -> tuple[Any, Sampler, list]:
    """``loop.DataPolicy`` of an online mixer; every check runs before the model is built."""
    if cfg.data.mixing.kind == "online-doremi":
        check_reference_tokenizer(cfg.rho1.reference, tokenizer)
    # Any domain may be read by every sample of the run: each stream holds num_samples.
    ds = build_domain_streams(
        cfg.data.domains,
        cfg.data.seq_len,
        num_samples,
        cfg.train.seed,
        tokenizer,
        reset_at_eod=cfg.data.reset_at_eod,
    )
    sampler = build_sampler(cfg, ds.domain_names)
    callbacks = []
    if cfg.data.mixing.kind == "online-doremi" and cfg.rho1.mode == "none":
        callbacks.append(DoReMiReference(cfg, out_dir))
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
    policy = functools.partial(online_data_policy, out_dir=Path(out_dir))
    return loop.run_training(
        cfg, out_dir, resume, extra_callbacks, data_policy=policy, objective=objective
    )
