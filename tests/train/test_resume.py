"""Kill / resume in subprocesses: SIGKILL during a save, SIGTERM (save and exit cleanly),
SIGKILL mid-training, then `--resume auto`; the per-step losses must equal, bitwise, those of a
run that was never interrupted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _ckpt_util import PY, REPO, baseline_run, evals, losses, subprocess_env, train_in_process

from sigma_moe.model.checkpoint_format import checkpoint_problem, resolve_checkpoint

UTIL = str(Path(__file__).with_name("_ckpt_util.py"))


def _run(run: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [PY, UTIL, str(run), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    sys.stderr.write(r.stderr[-3000:])
    return r


def test_kill_term_kill_resume_is_bitwise_exact(tmp_path):
    from _ckpt_util import config

    base = baseline_run()
    run = tmp_path / "run"
    ck = run / "checkpoints"

    # 1. SIGKILL while the step-4 checkpoint is being written.
    r = _run(run, "--kill-in-save", "4")
    assert r.returncode == -9, r.stderr[-2000:]
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert list(ck.glob("step_00000004.tmp-*")), "the interrupted save should be left as .tmp"
    assert not (ck / "step_00000004").exists()
    assert resolve_checkpoint(ck) == ck / "step_00000002"
    assert checkpoint_problem(ck / "step_00000002") is None

    # 2. Resume; SIGTERM after step 3: the run saves step 3 and exits cleanly (code 0).
    r = _run(run, "--resume", "auto", "--term-at", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[resume] from {ck / 'step_00000002'}" in r.stderr
    assert "removing unfinished save" in r.stderr
    assert "SIGTERM: saved step 3" in r.stderr
    assert "[test] run_training returned" in r.stderr
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert not list(ck.glob("*.tmp-*"))

    # 3. Resume; SIGKILL mid-training after step 5 (step 4 was saved on schedule).
    r = _run(run, "--resume", "auto", "--kill-at", "5")
    assert r.returncode == -9, r.stderr[-2000:]
    assert f"[resume] from {ck / 'step_00000003'}" in r.stderr
    assert (ck / "latest").read_text().strip() == "step_00000004"

    # 4. Resume to the end (in this process).
    train_in_process(config(), run, resume="auto")
    assert (ck / "latest").read_text().strip() == "step_00000007"

    want, got = losses(base), losses(run)
    assert sorted(got) == list(range(1, 8))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"loss"' in x]) == 7  # replayed steps are logged once
    assert got == want, {s: (want[s], got[s]) for s in want if want[s] != got[s]}
    assert evals(run) == evals(base)


def test_resume_with_rho1_scorer_is_bitwise_exact(tmp_path):
    """Exact resume with Rho-1 selection on (inline scorer; the reference losses are a pure
    function of the sample, the store position follows consumed_samples)."""
    import signal

    from _ckpt_util import Signal, config

    sys.path.insert(0, str(REPO / "tests" / "rho1"))
    from _rho1_helpers import make_hf_reference

    from sigma_moe.rho1.callback import Rho1Callback

    ref = make_hf_reference(tmp_path / "ref")
    cfg = config(
        "train.max_steps=4",
        "rho1.mode=excess",
        "rho1.select_ratio=0.5",
        f"rho1.reference={ref}",
        "rho1.scorer=inline",
        "rho1.scorer_batch_size=4",
        "train.eval_every=100",
        "checkpoint.every=100",
    )
    a, b = tmp_path / "a", tmp_path / "b"

    def rho1(out):
        return Rho1Callback(cfg.rho1, out, run_config=cfg)

    train_in_process(cfg, a, extra_callbacks=[rho1(a)])
    train_in_process(cfg, b, extra_callbacks=[rho1(b), Signal(2, signal.SIGTERM)])
    assert (b / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    train_in_process(cfg, b, resume="auto", extra_callbacks=[rho1(b)])
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2, 3, 4]
    assert la == lb


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun, 2 gloo processes (EP=2): SIGTERM reaches only rank 1; the ranks agree at the end
    of the step, both save the same checkpoint and the run exits with code 0."""
    import os
    import signal
    import socket
    import time

    from _ckpt_util import BASE_SETS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    extra = ["parallel.ep_size=2", "train.max_steps=200", "checkpoint.every=1000"]
    sets = [a for s in BASE_SETS + extra for a in ("--set", s)]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), "-m", "sigma_moe.cli", "train", str(REPO / "configs" / "test-tiny.yaml"),
           "--out", str(run), *sets]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        m = run / "metrics.jsonl"
        deadline = time.time() + 300
        while not (m.is_file() and m.read_text().count('"loss"') >= 2):
            assert p.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        ps = subprocess.run(["ps", "--ppid", str(p.pid), "-o", "pid=,args="],
                            capture_output=True, text=True).stdout  # fmt: skip
        workers = [int(x.split()[0]) for x in ps.splitlines() if "sigma_moe.cli" in x]
        assert len(workers) == 2, ps
        os.kill(workers[1], signal.SIGTERM)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "signal on another rank: saved step" in err
    ck = run / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    step = int(tag[5:])
    assert 2 <= step < 200
    assert checkpoint_problem(ck / tag) is None
    assert len(list((ck / tag).glob("rng_rank*.pt"))) == 2
