"""Fixtures for the kernel tier: one `backend` parameter runs every test on each backend.

* "torch"     -- always: the default path: for fp32, _cgemm (csrc/grouped_gemm.c, where it
                 builds), else MKL's grouped batch GEMM (where torch's MKL exports it); else
                 torch._grouped_mm where it takes the operands.
* "torch-mkl" -- always: the same backend with _cgemm off (MKL's batch GEMM for fp32).
* "torch-gmm" -- always: the same backend with the MKL batch off (torch._grouped_mm).
* "torch-bmm" -- always: the same backend with its ranged-bmm path forced (the path for
                 operands _grouped_mm refuses, and with SIGMA_MOE_GROUPED_MM=0).
* "interpret" -- the Triton kernels in Triton's interpreter; needs TRITON_INTERPRET=1 in the
                 environment before triton is first imported (the kernel CI command sets it for
                 the whole run), skipped otherwise.
* "triton"    -- marked `gpu`; skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

import sigma_moe_kernels.grouped_swiglu_torch as gst

BACKENDS = [
    "torch",
    "torch-mkl",
    "torch-gmm",
    "torch-bmm",
    "interpret",
    pytest.param("triton", marks=pytest.mark.gpu),
]

INTERPRET_SKIP = (
    "backend 'interpret' runs the Triton kernels in Triton's interpreter and needs "
    "TRITON_INTERPRET=1 set before triton is imported: run this tier as "
    "`TRITON_INTERPRET=1 pytest tests/kernels`"
)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    be = request.param
    if be in ("torch", "torch-mkl", "torch-gmm", "torch-bmm"):
        monkeypatch.setattr(gst, "_USE_CGEMM", be == "torch")
        monkeypatch.setattr(gst, "_USE_MKL_BATCH", be in ("torch", "torch-mkl"))
        monkeypatch.setattr(gst, "_USE_GROUPED_MM", be != "torch-bmm")
        return "torch"
    if be == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(INTERPRET_SKIP)
    if be == "triton" and not torch.cuda.is_available():
        pytest.skip("backend 'triton' needs a CUDA device")
    return be


@pytest.fixture
def device(backend) -> torch.device:
    return torch.device("cuda" if backend == "triton" else "cpu")


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like / Tensor.new_empty return NaN-filled floating tensors.

    A launcher that allocates with empty (no memset) must write every element: any element left
    unwritten then shows up as NaN in the result.  Returns the list of shapes passed to
    torch.zeros_like, so a test can also assert that no large buffer is zero-filled.
    """

    def poisoned(f):
        def g(*a, **kw):
            t = f(*a, **kw)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return g

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
    zeroed = []
    zeros_like = torch.zeros_like

    def recording_zeros_like(t, *a, **kw):
        zeroed.append(tuple(t.shape))
        return zeros_like(t, *a, **kw)

    monkeypatch.setattr(torch, "zeros_like", recording_zeros_like)
    return zeroed
