"""Components take their own config section (issue 10): the Trainer gets `train` and the
`LoopFacts` its builder reads from the other sections; no callback keeps the whole run config,
except as `run_config` handed on unread to the Rho-1 scorer (its side process rebuilds the data)."""

from __future__ import annotations

import dataclasses

import pytest
from _ckpt_util import config, train_in_process

from sigma_moe.config import RunConfig, TrainConfig
from sigma_moe.rho1.callback import Rho1Callback
from sigma_moe.run_mixing import DoReMiReference, ScorerPlan
from sigma_moe.train.hooks import Callback
from sigma_moe.train.loop import LoopFacts, loop_facts


def _run_config_holders(obj) -> list[str]:
    """The attributes of `obj` that hold the whole RunConfig."""
    return [k for k, v in vars(obj).items() if isinstance(v, RunConfig)]


class _Probe(Callback):
    """Records, at the start of training, which components hold the whole run config."""

    def on_train_start(self, trainer) -> None:
        self.trainer_sections = (trainer.train_cfg, trainer.facts)
        self.holders = {"Trainer": _run_config_holders(trainer)}
        for cb in trainer.callbacks:
            self.holders[type(cb).__name__] = _run_config_holders(cb)


def test_trainer_and_callbacks_hold_their_sections_not_the_run_config(tmp_path):
    cfg = config("train.max_steps=1", "model.topk_schedule=[{until_step: 1, layers: [0], topk: 1}]")
    probe = _Probe()
    summary = train_in_process(cfg, tmp_path / "run", extra_callbacks=[probe])
    assert summary["steps"] == 1
    train, facts = probe.trainer_sections
    assert isinstance(train, TrainConfig) and train == cfg.train
    # what the loop reads of the other sections, passed in by its builder
    assert facts.seq_len == cfg.data.seq_len
    assert list(facts.topk_schedule) == cfg.model.topk_schedule
    assert facts.ep_size == cfg.parallel.ep_size
    assert facts.zero_stage == 0  # test-tiny's ZeRO-1 runs as ZeRO-0 on one process
    assert facts.clean_domains == tuple(d.name for d in cfg.data.domains if d.clean)
    assert facts.accum == cfg.train.global_batch_size // cfg.train.micro_batch_size
    assert {"Trainer", "Checkpointer", "Evaluator", "NanGuard", "Summary"} <= set(probe.holders)
    assert all(not v for v in probe.holders.values()), probe.holders


def test_loop_facts_checks_the_process_count():
    cfg = config()
    assert loop_facts(cfg, 2).accum == cfg.train.global_batch_size // (
        2 * cfg.train.micro_batch_size
    )
    with pytest.raises(ValueError, match="train.global_batch_size"):
        loop_facts(cfg, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop_facts(cfg, 1).accum = 7  # type: ignore[misc]
    assert isinstance(loop_facts(cfg, 1), LoopFacts)


def test_policy_callbacks_read_their_section(tmp_path):
    cfg = config()
    for cb in (
        Rho1Callback(cfg.rho1, tmp_path, run_config=cfg),
        DoReMiReference(cfg.rho1, tmp_path, run_config=cfg),
    ):
        assert _run_config_holders(cb) == ["run_config"]  # handed on to the scorer, unread
    assert _run_config_holders(ScorerPlan(lambda: None, cfg.train.global_batch_size)) == []
