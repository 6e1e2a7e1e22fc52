"""Online mixing end to end: a SIGKILLed run resumed with --resume auto reproduces the
uninterrupted run's losses and mixing weights bitwise; a checkpoint of other domains is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
sys.path.insert(0, str(HERE.parent / "train"))

from _ckpt_util import subprocess_env  # noqa: E402


def _run(run: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [PY, str(HERE / "_mix_runner.py"), str(run), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    sys.stderr.write(r.stderr[-3000:])
    return r


def _steps(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = {k: v for k, v in m.items() if k == "loss" or k.startswith("mix_")}
    return out


def _kill_resume_matches(tmp_path: Path, sets: list[str]) -> Path:
    base, run = tmp_path / "base", tmp_path / "run"
    assert _run(base, *sets).returncode == 0
    r = _run(run, *sets, "--kill-at", "5")
    assert r.returncode == -9, r.stderr[-2000:]
    r = _run(run, *sets, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[resume] from" in r.stderr and "step_00000004" in r.stderr
    a, b = _steps(base), _steps(run)
    assert sorted(a) == list(range(1, 8)) and a == b  # bitwise: floats compared exactly
    ws = {tuple(v[k] for k in sorted(v) if k.startswith("mix_")) for v in a.values()}
    assert len(ws) > 2, "the weights should change during the run (update_every=1)"
    # the domain × expert counts between evals survive the kill too (resumable state, no
    # duplicated lines from the killed run)
    el = "expert_load.jsonl"
    assert (run / el).read_text() == (base / el).read_text()
    return run


@pytest.mark.slow
def test_bandit_kill_resume_is_bitwise_and_other_domains_are_refused(tmp_path):
    sets = ["--set", "data.mixing.kind=online-bandit", "--set", "data.mixing.update_every=1"]
    run = _kill_resume_matches(tmp_path, sets)
    two = "data.domains=[{name: prose, path: bundled}, {name: code, path: bundled}]"
    r = _run(run, *sets, "--set", two, "--set", "train.max_steps=9", "--resume", "auto")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "['prose', 'code', 'math', 'webnoise']" in r.stderr and "['prose', 'code']" in r.stderr
    assert _steps(run) == _steps(tmp_path / "base")  # nothing trained, nothing lost


@pytest.mark.slow
def test_doremi_kill_resume_is_bitwise(tmp_path, ours_reference):
    sets = [
        "--set",
        "data.mixing.kind=online-doremi",
        "--set",
        "data.mixing.update_every=1",
        "--set",
        f"rho1.reference={ours_reference}",
    ]
    run = _kill_resume_matches(tmp_path, sets)
    assert (run / "ref_store").is_dir()
