"""Resumable state per component (sigma_moe.train.hooks.Stateful): the checkpoint saves one dict
of named component states and a resume restores each exactly; a checkpoint without a stateful
component's state is refused naming it; the old `train_state["extra"]` layout still resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _ckpt_util import baseline_run, config, train_in_process

from sigma_moe.model.checkpoint_format import folder_manifest
from sigma_moe.train.hooks import Callback

MAIN = "mp_rank_00_model_states.pt"


class Crash(RuntimeError):
    pass


class Recorder(Callback):
    """A stateful test callback: per step, the float64 sum of its input ids (updated in
    `on_batches`, before the checkpointer saves the step, as hooks.py asks of a callback after
    the checkpointer); `crash_at`: raise after that step (a killed run: no final save)."""

    def __init__(self, crash_at: int | None = None):
        self.per_step: dict[int, float] = {}
        self.total = torch.zeros((), dtype=torch.float64)
        self.crash_at = crash_at

    def state_dict(self):
        return {"per_step": dict(self.per_step), "total": self.total.clone()}

    def load_state_dict(self, state):
        self.per_step, self.total = dict(state["per_step"]), state["total"].clone()

    def on_batches(self, trainer, batches):
        v = sum(float(b["input_ids"].double().sum()) for b in batches)
        self.per_step[trainer.state.step] = v
        self.total += v

    def on_step_end(self, trainer, m):
        if m["step"] == self.crash_at:
            raise Crash(f"killed after step {m['step']}")


class StopAtResume(Callback):
    """Capture every component's state right after the resume, then stop before any step."""

    def on_resume(self, trainer):
        self.states = {k: c.state_dict() for k, c in trainer.components.items()}
        trainer.stop_requested = "test: resumed"


def _client(ckpt: Path) -> dict:
    return torch.load(ckpt / MAIN, map_location="cpu", weights_only=False)["train_state"]


def _same(a, b) -> bool:
    """Bitwise equality of nested states (tensors, arrays, floats)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_component_state_survives_kill_and_resume_bitwise(tmp_path):
    base = baseline_run()  # 7 steps, checkpoints 2, 4, 6, 7, never interrupted
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    killed = Recorder(crash_at=5)
    with pytest.raises(Crash):
        train_in_process(config(), run, extra_callbacks=[killed])
    assert (ck / "latest").read_text().strip() == "step_00000004"
    saved = _client(ck / "step_00000004")["components"]
    assert set(saved) == {
        "sampler",
        "callbacks/Evaluator",
        "callbacks/ExpertLoadByDomain",
        "callbacks/Recorder",
    }
    assert sorted(saved["callbacks/Recorder"]["per_step"]) == [0, 1, 2, 3]

    resumed = Recorder()
    train_in_process(config(), run, resume="auto", extra_callbacks=[resumed])
    # Every step counted once: 0-3 restored from the checkpoint, 4-6 trained after the resume.
    assert sorted(resumed.per_step) == list(range(7))
    assert sorted(killed.per_step) == [0, 1, 2, 3, 4]  # steps 1-5 (0-based 0-4) ran first
    assert all(resumed.per_step[s] == killed.per_step[s] for s in range(5))
    want = torch.zeros((), dtype=torch.float64)
    for s in range(7):
        want += resumed.per_step[s]
    assert torch.equal(resumed.total, want)
    # The trainer's own components end exactly as in the uninterrupted run.
    got = _client(ck / "step_00000007")["components"]
    ref = _client(base / "checkpoints" / "step_00000007")["components"]
    got.pop("callbacks/Recorder")
    assert set(got) == set(ref) and all(_same(got[k], ref[k]) for k in ref), got.keys()
    hist = got["callbacks/Evaluator"]["history"]
    assert [h["step"] for h in hist] == [0, 3, 6, 7]
    assert np.asarray(got["callbacks/ExpertLoadByDomain"]["total"]).sum() > 0


def test_checkpoint_without_a_components_state_is_refused_naming_it(tmp_path):
    ck = baseline_run() / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match=r"callbacks/Recorder") as e:
        train_in_process(config(), tmp_path / "a", resume=str(ck), extra_callbacks=[Recorder()])
    assert str(ck) in str(e.value)
    # A callback without resumable state needs none: the resume goes ahead.
    probe = StopAtResume()
    train_in_process(config(), tmp_path / "b", resume=str(ck), extra_callbacks=[probe])
    assert _same(probe.states, _client(ck)["components"])


def test_old_extra_layout_still_resumes(tmp_path):
    """A checkpoint written before components had their own state (`train_state["extra"]`)."""
    src = baseline_run() / "checkpoints" / "step_00000004"
    new = _client(src)["components"]
    old = tmp_path / "old" / "checkpoints" / "step_00000004"
    shutil.copytree(src, old)
    main = torch.load(old / MAIN, map_location="cpu", weights_only=False)
    ts = {k: v for k, v in main["train_state"].items() if k != "components"}
    ts["extra"] = {
        "sampler": new["sampler"],
        "eval_history": new["callbacks/Evaluator"]["history"],
        "expert_load": new["callbacks/ExpertLoadByDomain"],
        "scorer": {"scorer_wait_s": 0.0},  # telemetry of old Rho-1 runs: ignored
    }
    main["train_state"] = ts
    torch.save(main, old / MAIN)
    meta = json.loads((old / "meta.json").read_text())
    meta.update(folder_manifest(old))
    (old / "meta.json").write_text(json.dumps(meta))
    probe = StopAtResume()
    train_in_process(config(), tmp_path / "run", resume=str(old), extra_callbacks=[probe])
    assert _same(probe.states, new)
