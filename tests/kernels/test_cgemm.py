"""_cgemm (csrc/grouped_gemm.c): every GEMM form against per-expert torch products, on awkward
shapes (empty experts, row counts around the 6-row tile and the 64-row panel, tails of 16-lane
vectors, strided operands, one expert with most rows), one and two threads; and its build:
available where it should be, a clear reason where it is not, torch's OpenMP runtime only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import sigma_moe_kernels as K
from sigma_moe_kernels import _cgemm

CAN_BUILD = _cgemm._cpu_ok() is None and shutil.which(os.environ.get("CC", "cc")) is not None
needs_cgemm = pytest.mark.skipif(
    not _cgemm.available(), reason=f"cgemm unavailable: {_cgemm.why_unavailable()}"
)

COUNTS = {
    "mixed": [0, 1, 5, 6, 7, 0, 0, 13, 63, 64, 65, 2],
    "one_large": [3, 200, 0, 1],  # > 64 rows: several tasks, several transposed chunks
    "all_empty_but_one": [0, 0, 9, 0],
}


def test_available_where_the_cpu_and_a_compiler_allow_it():
    # CI's machine has AVX-512 and gcc: there the fast path must build, not silently fall back
    assert _cgemm.available() == CAN_BUILD, _cgemm.why_unavailable()


def _ref_rows(a, b, counts):
    out, r = [], 0
    for e, c in enumerate(counts):
        out.append(a[r : r + c].double() @ b[e].double())
        r += c
    return torch.cat(out)


def _strided(rows, cols, gen, pad=3):
    """A [rows, cols] view with row stride cols + pad (not a multiple of 16 floats)."""
    return torch.randn(rows, cols + pad, generator=gen)[:, :cols]


@needs_cgemm
@pytest.mark.parametrize("case", sorted(COUNTS))
@pytest.mark.parametrize("K,n", [(17, 40), (64, 64), (70, 130), (1, 16)])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_mm_matches_per_expert_products(case, K, n, trans_b, beta, threads):
    counts = COUNTS[case]
    gen = torch.Generator().manual_seed(K * 131 + n + len(counts))
    N, E = sum(counts), len(counts)
    a = _strided(N, K, gen)
    b = (
        torch.randn(E, n, K, generator=gen).transpose(1, 2)
        if trans_b
        else torch.randn(E, K, n, generator=gen)
    )
    out = _strided(N, n, gen)
    before = out.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _cgemm.Groups(counts).rows_mm((a, b, out), beta=beta)
    finally:
        torch.set_num_threads(old)
    want = _ref_rows(a, b, counts) + (before.double() if beta else 0.0)
    torch.testing.assert_close(out.double(), want, atol=1e-4 * K**0.5, rtol=1e-5)


@needs_cgemm
@pytest.mark.parametrize("trans_b", [False, True])
def test_rows_mm_sum_adds_two_products_in_one_pass(trans_b):
    counts = COUNTS["mixed"]
    gen = torch.Generator().manual_seed(5)
    N, E, K, n = sum(counts), len(counts), 48, 72
    a1, a2 = torch.randn(N, K, generator=gen), torch.randn(N, K, generator=gen)

    def w():
        t = torch.randn(E, n, K, generator=gen)
        return t.transpose(1, 2) if trans_b else t.transpose(1, 2).contiguous()

    b1, b2 = w(), w()
    out = torch.full((N, n), float("nan"))
    _cgemm.Groups(counts).rows_mm_sum([(a1, b1), (a2, b2)], out)
    want = _ref_rows(a1, b1, counts) + _ref_rows(a2, b2, counts)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-5)


@needs_cgemm
@pytest.mark.parametrize("case", sorted(COUNTS))
@pytest.mark.parametrize("Ka,n", [(37, 40), (64, 64), (130, 17)])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_weights_mm_matches_and_writes_every_element(case, Ka, n, misaligned, threads):
    counts = COUNTS[case]
    gen = torch.Generator().manual_seed(Ka + n)
    N, E = sum(counts), len(counts)
    a, b = _strided(N, Ka, gen), _strided(N, n, gen)
    # NaN-filled output (as from torch.empty): an element left unwritten shows up; a view one
    # float off a 64-byte boundary takes the non-streaming stores
    buf = torch.full((E * Ka * n + 16,), float("nan"))
    out = buf[1 : 1 + E * Ka * n].view(E, Ka, n) if misaligned else buf[: E * Ka * n].view(E, Ka, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _cgemm.Groups(counts).weights_mm((a, b), outs=[out])
    finally:
        torch.set_num_threads(old)
    r = 0
    for e, c in enumerate(counts):
        want = a[r : r + c].double().T @ b[r : r + c].double()
        torch.testing.assert_close(out[e].double(), want, atol=1e-4 * max(c, 1) ** 0.5, rtol=1e-5)
        r += c


@needs_cgemm
def test_rows_mm_sum_with_differently_laid_out_pairs():
    # the gate weight a slice of a wider [E, 2F, K] tensor, the up weight its own: two passes
    counts = COUNTS["mixed"]
    gen = torch.Generator().manual_seed(6)
    N, E, K, n = sum(counts), len(counts), 40, 48
    a1, a2 = torch.randn(N, K, generator=gen), _strided(N, K, gen)
    b1 = torch.randn(E, 2 * n, K, generator=gen)[:, :n].transpose(1, 2)
    b2 = torch.randn(E, n, K, generator=gen).transpose(1, 2)
    out = torch.full((N, n), float("nan"))
    _cgemm.Groups(counts).rows_mm_sum([(a1, b1), (a2, b2)], out)
    want = _ref_rows(a1, b1, counts) + _ref_rows(a2, b2, counts)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-5)


@needs_cgemm
def test_bad_beta_and_pair_count_raise():
    g = _cgemm.Groups([2, 3])
    a, b, out = torch.randn(5, 8), torch.randn(2, 8, 16), torch.empty(5, 16)
    with pytest.raises(ValueError, match="beta must be 0 or 1"):
        g.rows_mm((a, b, out), beta=0.5)
    with pytest.raises(ValueError, match="one or two pairs"):
        g.rows_mm_sum([(a, b)] * 3, out)
    with pytest.raises(ValueError, match="contiguous"):
        g.weights_mm((a, out), outs=[torch.empty(2, 16, 8)])


def _probe(env: dict, code: str) -> str:
    full_env = {**os.environ, **env}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


REASON = "import torch; from sigma_moe_kernels import _cgemm; print(_cgemm.available(), _cgemm.why_unavailable())"


def test_switched_off_by_env():
    assert _probe({"SIGMA_MOE_CGEMM": "0"}, REASON) == "False SIGMA_MOE_CGEMM=0"


@pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX-512 CPU")
def test_no_compiler_says_so_and_falls_back(tmp_path):
    out = _probe({"CC": "no-such-cc", "SIGMA_MOE_CACHE_DIR": str(tmp_path)}, REASON)
    assert out == "False no C compiler (no-such-cc) on PATH"
    # the experts still run (on MKL's batch GEMM or torch._grouped_mm)
    code = (
        "import torch, sigma_moe_kernels as K;"
        "x = torch.randn(10, 8); w = [torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 4, 8)];"
        "y = K.grouped_swiglu(x, torch.tensor([4, 6]), *w); print(tuple(y.shape))"
    )
    assert _probe({"CC": "no-such-cc", "SIGMA_MOE_CACHE_DIR": str(tmp_path)}, code) == "(10, 8)"


@pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX-512 CPU and a C compiler")
def test_builds_once_into_the_cache_and_shares_torchs_openmp(tmp_path):
    code = (
        "import torch; from sigma_moe_kernels import _cgemm; assert _cgemm.available();"
        "import numpy as np; g = _cgemm.Groups([3, 2]);"
        "g.rows_mm((torch.randn(5, 8), torch.randn(2, 8, 16), torch.empty(5, 16)));"
        "maps = {ln.split()[-1] for ln in open('/proc/self/maps') if 'libgomp' in ln};"
        "print(len(maps), all('torch' in m for m in maps))"
    )
    env = {"SIGMA_MOE_CACHE_DIR": str(tmp_path)}
    assert _probe(env, code) == "1 True"  # one OpenMP runtime: torch's
    built = list(tmp_path.glob("grouped_gemm-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    _probe(env, code)  # a second process loads the built library, it does not build again
    assert list(tmp_path.glob("grouped_gemm-*.so")) == built
    assert built[0].stat().st_mtime_ns == mtime


@needs_cgemm
def test_grouped_swiglu_with_a_sliced_gate_weight_matches_reference():
    # through the op: w_gate a slice of a wider tensor, w_up its own (dx's pair takes two passes)
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor(COUNTS["mixed"])
    N, E, D, F = int(counts.sum()), len(counts), 32, 24
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    wg = (torch.randn(E, D, 2 * F, generator=gen) / D**0.5)[..., :F].requires_grad_()
    wu = (torch.randn(E, D, F, generator=gen) / D**0.5).requires_grad_()
    wd = (torch.randn(E, F, D, generator=gen) / F**0.5).requires_grad_()
    ws = (wg, wu, wd)
    y = K.grouped_swiglu(x, counts, *ws, backend="torch")
    y_ref = K.reference.grouped_swiglu(x, counts, *ws)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    g = torch.randn(N, D, generator=gen)
    got = torch.autograd.grad((y * g).sum(), [x, *ws])
    want = torch.autograd.grad((y_ref * g).sum(), [x, *ws])
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
