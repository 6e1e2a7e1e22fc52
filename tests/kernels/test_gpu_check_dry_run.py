"""scripts/gpu_check.sh --dry-run: the GPU script's whole path on CPU (interpreter, tiny shapes).

The script is meant for the first minutes on a rented H100/H200; running it here on every CI
run keeps it from rotting (imports, the test-tier command, every benchmark row, the report).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPS = {
    "router fwd",
    "router bwd",
    "permute fwd (gather)",
    "permute fwd (argsort + gather)",
    "unpermute fwd (combine)",
    "permute bwd (combine)",
    "unpermute bwd",
    "grouped SwiGLU fwd",
    "grouped SwiGLU bwd",
    "grouped SwiGLU fwd+bwd, N-fastest grid",
    "grouped SwiGLU fwd+bwd, M-fastest grid",
    "dense GEMMs, same FLOPs as fwd",
    "layer fwd+bwd, torch._grouped_mm experts",
    "layer fwd+bwd, ours",
}


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "tests collected" in (tmp_path / "pytest-gpu.txt").read_text()
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["backend"] == "interpret" and rep["copy_gb_s"] > 0
    for k, routing in ((1, "balanced"), (2, "skewed")):
        rows = [r for r in rep["rows"] if r["k"] == k and r["routing"] == routing]
        assert {r["op"] for r in rows} == OPS
        assert all(r["us"] > 0 for r in rows)
        # every target row says whether it was met; memory-bound rows carry GB/s, GEMMs TFLOP/s
        assert all(r["met"] in (True, False) for r in rows if r["target"] is not None)
        assert all(r["gb_s"] > 0 for r in rows if r["target"] == 0.7)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "layer fwd+bwd, ours" in md and "TFLOP/s" in md
