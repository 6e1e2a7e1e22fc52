"""Run a test's body in a fresh pytest subprocess: the in-process trainings of this folder were
where two fresh-clone suite runs on 2026-12-01 began failing natively (a segfault; then
UnicodeDecodeError from every later op call in the process), cause not found; a child process
keeps such damage out of the rest of the suite."""

from __future__ import annotations

import os
import subprocess
import sys

INNER = "SIGMA_MOE_ISOLATED_TEST"


def in_child(nodeid: str) -> bool:
    """True inside the child (run the body); in the parent, run the child and assert it passed."""
    if os.environ.get(INNER) == nodeid:
        return True
    env = dict(os.environ, **{INNER: nodeid})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return False
