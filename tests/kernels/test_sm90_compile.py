"""The `sm90` tier: every Triton kernel compiled ahead of time for Hopper (sm_90a), no GPU needed.

One subprocess (Triton must be in compiled mode, while this suite runs with TRITON_INTERPRET=1)
runs `python -m sigma_moe_kernels._sm90` over every configuration the launchers can pick at the
Sigma-MoE-Tiny shape (bf16 and fp32, constexpr combinations, the autotune configs); the tests
assert on its JSON.  Cold: ~2 min on a shared 2-core machine; results are cached per kernel
source hash (see the module), so an unchanged kernel costs nothing and a changed one recompiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigma_moe_kernels as K
from sigma_moe_kernels._gemm_tiles import resolve_precision

triton = pytest.importorskip("triton")
H100_SMEM = 227 * 1024


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:  # no nvidia backend / ptxas in this triton wheel
        return False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _has_nvidia_backend():
        pytest.skip("this triton wheel has no NVIDIA backend / ptxas")
    out = tmp_path_factory.mktemp("sm90") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "sigma_moe_kernels._sm90", "--json", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"sm90 compile crashed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    rep = json.loads(out.read_text())
    print(f"sm90 tier: Triton {rep['triton']}, {len(rep['specs'])} compiles, {rep['seconds']} s")
    return rep


def _ok(rep):
    return [s for s in rep["specs"] if s["result"].get("ok")]


def _name(s):
    return f"{s['kernel']}[{s['dtype']}: {s['label']}]"


def test_sm90_every_kernel_compiles(report):
    bad = [f"{_name(s)}: {s['result']['error']}" for s in report["specs"] if s not in _ok(report)]
    assert not bad, "\n".join(bad)
    compiled = {(s["module"], s["kernel"]) for s in report["specs"]}
    every = {tuple(x) for x in report["jit_kernels"]}
    assert len(every) >= 8 and every == compiled, f"kernels not in the sweep: {every - compiled}"
    assert report["triton"] == triton.__version__


def test_sm90_no_register_spills(report):
    spills = [
        f"{_name(s)}: {s['result']['spill_stores']} B stores / {s['result']['spill_loads']} B loads"
        f" ({s['result']['registers']} registers)"
        for s in _ok(report)
        if s["result"]["spill_stores"] or s["result"]["spill_loads"]
    ]
    assert not spills, "register spills on sm_90a:\n" + "\n".join(spills)
    assert all(s["result"]["registers"] for s in _ok(report)), "ptxas log not parsed"


def test_sm90_shared_memory_within_h100(report):
    big = [f"{_name(s)}: {s['result']['shared']} B" for s in _ok(report)
           if s["result"]["shared"] > H100_SMEM]  # fmt: skip
    assert not big, f"over the H100's {H100_SMEM} B of shared memory:\n" + "\n".join(big)


def test_sm90_gemms_use_wgmma(report):
    gemms = [s for s in _ok(report) if s["gemm"]]
    assert len(gemms) >= 18
    # bf16: Hopper's warpgroup MMA, never the Ampere mma.sync path
    bad = [_name(s) for s in gemms if s["result"]["wgmma"] == 0 or s["result"]["mma_sync"] > 0]
    assert not bad, "GEMM configs not on wgmma:\n" + "\n".join(bad)
    wgrad = [s for s in gemms if s["kernel"] == "_gmm_wgrad_kernel" and s["dtype"] == "bf16"]
    assert wgrad and all(s["constexprs"]["BLOCK_K"] >= 64 for s in wgrad)


def test_sm90_fp32_runs_tf32x3_by_default(report):
    # plain tf32 (Triton's default for fp32 dots) has ~2e-3 relative error: fp32 layers get
    # the 3-pass split (3 MMAs per product) unless the user asks torch for "high"/"medium"
    fp32 = [s for s in _ok(report) if s["gemm"] and s["dtype"] == "fp32"]
    assert fp32 and all(s["constexprs"]["PRECISION"] == "tf32x3" for s in fp32)
    for s in fp32:  # tensor cores (3 tf32 wgmma per product), not the FMA path of "ieee"
        assert s["result"]["wgmma"] >= 6, _name(s)


def test_precision_resolution_follows_torch(monkeypatch):
    assert resolve_precision(torch.bfloat16, None) == "tf32"
    assert resolve_precision(torch.float32, None) == "tf32x3"  # torch's default: "highest"
    assert resolve_precision(torch.float32, "ieee") == "ieee"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert resolve_precision(torch.float32, None) == "tf32"
    with pytest.raises(ValueError, match="input_precision"):
        resolve_precision(torch.float32, "fp64")
    x = torch.zeros(2, 8)
    ws = [torch.zeros(1, 8, 4), torch.zeros(1, 8, 4), torch.zeros(1, 4, 8)]
    with pytest.raises(ValueError, match="input_precision"):
        K.grouped_swiglu(x, torch.tensor([2]), *ws, backend="torch", input_precision="x")
