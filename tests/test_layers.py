"""The dependency rule of pyproject.toml ([tool.importlinter]) holds, and the check can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_hold():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    # A copy of the packages with one import from train/ up into rho1/ (what the old loop did).
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "sigma_moe", tmp_path / "sigma_moe", ignore=ignore)
    shutil.copytree(REPO / "sigma_moe_kernels", tmp_path / "sigma_moe_kernels", ignore=ignore)
    loop = tmp_path / "sigma_moe" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _f():\n    from sigma_moe.rho1 import callback\n")
    r = _lint(tmp_path, pythonpath=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "BROKEN" in out and "sigma_moe.train.loop -> sigma_moe.rho1.callback" in out, out
