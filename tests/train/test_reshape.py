"""Reshaping across expert-parallel sizes, optimizer state included: a checkpoint saved with
EP=1 on 1 process resumes with EP=2 on 2 gloo processes (reshaped on load), and one saved with
EP=2 on 2 processes resumes with EP=1 on 1 process (through `sigma-moe convert-checkpoint`).
The 5 steps after the load match the run that was not reshaped (fp32; the reduction order
differs, hence a tolerance)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ckpt_util import (
    BASE_SETS,
    PY,
    REPO,
    baseline_run,
    config,
    losses,
    subprocess_env,
    train_in_process,
)

from sigma_moe import cli
from sigma_moe.model.checkpoint_format import read_meta
from sigma_moe.model.inference import load_model_for_inference
from sigma_moe.train.reshape import consolidate

pytestmark = pytest.mark.distributed
TOL = 2e-4  # |Δloss| allowed after a reshape (fp32, other reduction order)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run: Path, *extra: str) -> None:
    sets = [a for s in BASE_SETS + ["parallel.ep_size=2"] for a in ("--set", s)]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_port", str(_free_port()), "-m", "sigma_moe.cli", "train",
           str(REPO / "configs" / "test-tiny.yaml"), "--out", str(run), *sets, *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    sys.stderr.write(r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]


def _close(got: dict[int, float], want: dict[int, float], steps) -> float:
    diff = max(abs(got[s] - want[s]) for s in steps)
    print(f"reshape: steps {list(steps)} max |dloss| = {diff:.3g}")
    assert diff < TOL, {s: (want[s], got[s]) for s in steps}
    return diff


class _StateCheck:
    """After the reshaped load: every weight, fp32 master and Adam moment equals the source's."""

    def __init__(self, full):
        self.full, self.checked = full, 0

    def on_train_start(self, trainer):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for n, p in trainer.model.named_parameters():
            assert torch.equal(p.detach(), self.full["module"][n]), n
            fp32 = safe_get_full_fp32_param(p)
            fp32 = p.detach() if fp32 is None else fp32  # ZeRO-0 (one process): p is the master
            assert torch.equal(fp32, self.full["fp32"][n]), n
            for k in ("exp_avg", "exp_avg_sq"):
                got = safe_get_full_optimizer_state(p, k)
                if got is None:  # ZeRO-0: torch's optimizer holds the state
                    got = trainer.engine.optimizer.state[p][k]
                assert torch.equal(got, self.full["optim"][n][k]), (n, k)
            self.checked += 1


_EP2: dict[str, Path] = {}


def _ep2_run(tmp_path_factory) -> Path:
    if "dir" not in _EP2:
        run = tmp_path_factory.mktemp("ep2") / "run"
        _torchrun(run)
        _EP2["dir"] = run
    return _EP2["dir"]


def test_reshape_ep1_to_ep2_on_load(tmp_path):
    base = baseline_run()
    run = tmp_path / "run"
    _torchrun(run, "--resume", str(base / "checkpoints" / "step_00000002"))
    got, want = losses(run), losses(base)
    assert sorted(got) == [3, 4, 5, 6, 7]
    _close(got, want, range(3, 8))
    meta = read_meta(run / "checkpoints" / "step_00000007")
    assert meta["ep_size"] == 2 and meta["world_size"] == 2
    assert len(list((run / "checkpoints" / "step_00000007").glob("layer_0_expert_*"))) == 2


def test_reshape_ep2_to_ep1_with_convert_checkpoint(tmp_path_factory, tmp_path):
    ep2 = _ep2_run(tmp_path_factory)
    src = ep2 / "checkpoints" / "step_00000002"
    out = tmp_path / "ep1-step2"
    assert cli.main(["convert-checkpoint", str(src), str(out), "--ep-size", "1"]) == 0
    meta = read_meta(out)
    assert meta["format"] == "universal" and meta["ep_size"] == 1 and meta["step"] == 2
    # the layout-free state holds every expert and its Adam moments
    full = consolidate(src)
    name = "layers.0.moe.deepspeed_moe.experts.deepspeed_experts.0.w_gate_EDF"
    assert full["fp32"][name].shape[0] == 8 and full["optim"][name]["exp_avg"].shape[0] == 8
    assert torch.equal(full["fp32"][name], full["module"][name])

    model, _, _ = load_model_for_inference(out)  # `eval` / `generate` read it too
    assert model.layers[0].moe.experts.w_gate_EDF.shape[0] == 8

    run = tmp_path / "run"
    check = _StateCheck(full)
    train_in_process(config(), run, resume=str(out), extra_callbacks=[check])
    assert check.checked == len(full["module"])
    got, want = losses(run), losses(ep2)
    assert sorted(got) == [3, 4, 5, 6, 7]
    _close(got, want, range(3, 8))


def test_reshape_ep2_to_ep1_on_load_matches_convert(tmp_path_factory, tmp_path):
    """The same EP=2 checkpoint, reshaped on load without converting first."""
    ep2 = _ep2_run(tmp_path_factory)
    run = tmp_path / "run"
    train_in_process(config(), run, resume=str(ep2 / "checkpoints" / "step_00000006"))
    got, want = losses(run), losses(ep2)
    assert sorted(got) == [7]
    _close(got, want, [7])


@pytest.mark.parametrize("stage", [0, 2])
def test_zero_stage_change_on_load(tmp_path, stage):
    """A ZeRO-0 / ZeRO-2 checkpoint resumes under ZeRO-1 (same process count): the optimizer
    state moves between layouts (one process: the same arithmetic, so the losses agree)."""
    src = tmp_path / "src"
    train_in_process(config(f"parallel.zero_stage={stage}", "train.max_steps=4"), src)
    run = tmp_path / "run"
    check = _StateCheck(consolidate(src / "checkpoints" / "step_00000002"))
    train_in_process(
        config("train.max_steps=4"),
        run,
        resume=str(src / "checkpoints" / "step_00000002"),
        extra_callbacks=[check],
    )
    assert check.checked > 0
    _close(losses(run), losses(src), [3, 4])


def test_convert_checkpoint_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert-checkpoint", "--help"])
    assert e.value.code == 0 and "--ep-size" in capsys.readouterr().out
    ck = baseline_run() / "checkpoints"
    assert cli.main(["convert-checkpoint", str(ck), str(tmp_path / "o"), "--ep-size", "3"]) == 2
    assert "--ep-size 3 must be >= 1 and divide num_experts (8)" in capsys.readouterr().err
    assert cli.main(["convert-checkpoint", str(tmp_path / "none"), str(tmp_path / "o"),
                     "--ep-size", "2"]) == 2  # fmt: skip
    assert "no checkpoint at" in capsys.readouterr().err
