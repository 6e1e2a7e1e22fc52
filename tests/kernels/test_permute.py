"""permute / unpermute: outputs and gradients vs the reference on every backend."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import sigma_moe_kernels as K

TS = [1, 7, 128, 1031]
ES = [1, 8, 96]
KS = [1, 2, 8]
CASES = [(T, E, k) for T in TS for E in ES for k in KS if k <= E]


def _experts(T, E, k, gen):
    """k distinct experts per token (what topk_route produces)."""
    return torch.rand(T, E, generator=gen).argsort(dim=-1)[:, :k].contiguous()


def _run_pair(x, experts, weights, backend):
    """permute -> (identity 'expert' work) -> unpermute, with the reference side by side."""
    device = x.device
    x_ref = x.detach().cpu().requires_grad_()
    w_ref = weights.detach().cpu().requires_grad_()
    xs, row_map = K.permute(x, experts.to(device), backend=backend)
    xs_ref, row_map_ref = K.reference.permute(x_ref, experts)
    assert row_map.dtype == torch.int64 and row_map.shape == (experts.numel(),)
    torch.testing.assert_close(row_map.cpu(), row_map_ref)
    torch.testing.assert_close(xs.detach().cpu(), xs_ref.detach(), atol=0, rtol=0)
    # some per-row transformation so the unpermute input differs from the permute output
    scale = torch.linspace(0.5, 1.5, xs.shape[0]).unsqueeze(1).to(x.dtype)
    ys = xs * scale.to(device)
    ys_ref = xs_ref * scale
    y = K.unpermute(ys, row_map, weights, backend=backend)
    y_ref = K.reference.unpermute(ys_ref, row_map_ref, w_ref)
    return (y, x, weights), (y_ref, x_ref, w_ref)


def _check_grads(ours, ref, atol, rtol):
    y, x, w = ours
    y_ref, x_ref, w_ref = ref
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), atol=atol, rtol=rtol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    gx, gw = torch.autograd.grad((y * g.to(y.device)).sum(), (x, w))
    gx_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), (x_ref, w_ref))
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(gx.cpu(), gx_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.cpu(), gw_ref, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("T,E,k", CASES)
def test_permute_unpermute_match_reference(T, E, k, backend, device):
    gen = torch.Generator().manual_seed(T * 31 + E + k)
    D = 48
    x = torch.randn(T, D, generator=gen).to(device).requires_grad_()
    experts = _experts(T, E, k, gen)
    weights = torch.rand(T, k, generator=gen).to(device).requires_grad_()
    ours, ref = _run_pair(x, experts, weights, backend)
    _check_grads(ours, ref, atol=1e-5, rtol=1e-5)


def test_row_map_semantics_and_stability(backend, device):
    experts = torch.tensor([[2, 0], [0, 2], [1, 0], [2, 1]])
    x = torch.arange(4.0).unsqueeze(1).repeat(1, 20).to(device)
    xs, row_map = K.permute(x, experts.to(device), backend=backend)
    # sorted pairs: expert 0: (0,1),(1,0),(2,1); expert 1: (2,0),(3,1); expert 2: (0,0),(1,1),(3,0)
    assert xs[:, 0].cpu().tolist() == [0, 1, 2, 2, 3, 0, 1, 3]
    assert row_map.cpu().tolist() == [5, 0, 1, 6, 3, 2, 7, 4]
    for i in range(8):  # x_sorted[row_map[t*k+j]] == x[t]
        assert xs[row_map[i], 0].item() == i // 2


@pytest.mark.parametrize("D", [1, 300])
def test_all_tokens_one_expert_and_odd_hidden(D, backend, device):
    gen = torch.Generator().manual_seed(0)
    T, k = 1031, 1
    x = torch.randn(T, D, generator=gen).to(device).requires_grad_()
    experts = torch.full((T, k), 5)
    weights = torch.rand(T, k, generator=gen).to(device).requires_grad_()
    ours, ref = _run_pair(x, experts, weights, backend)
    _check_grads(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, backend, device):
    # permute moves bits (exact). unpermute accumulates in fp32 and rounds once to the
    # activation dtype, like the reference: both sides round the same fp32 sum, so they agree to
    # about one ulp of the dtype (bf16: 2^-8 relative -> rtol 1.6e-2, atol 1e-2 for O(1) values).
    gen = torch.Generator().manual_seed(0)
    T, E, k, D = 130, 8, 2, 48
    x = torch.randn(T, D, generator=gen).to(dtype).to(device).requires_grad_()
    experts = _experts(T, E, k, gen)
    weights = torch.rand(T, k, generator=gen).to(device).requires_grad_()
    ours, ref = _run_pair(x, experts, weights, backend)
    _check_grads(ours, ref, atol=1e-2, rtol=1.6e-2)


def test_zero_tokens(backend, device):
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.int64, device=device)
    xs, row_map = K.permute(x, experts, backend=backend)
    assert xs.shape == (0, 16) and row_map.shape == (0,)
    w = torch.zeros(0, 2, device=device, requires_grad=True)
    y = K.unpermute(xs, row_map, w, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and w.grad.shape == (0, 2)


def test_bad_args_raise(backend, device):
    x = torch.randn(4, 16, device=device)
    e = torch.zeros(4, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="x_TD"):
        K.permute(x[0], e, backend=backend)
    with pytest.raises(ValueError, match="experts_TK"):
        K.permute(x, e.float(), backend=backend)
    with pytest.raises(ValueError, match="experts_TK"):
        K.permute(x, e[:3], backend=backend)
    xs, rm = K.permute(x, e, backend=backend)
    w = torch.ones(4, 2, device=device)
    with pytest.raises(ValueError, match="row_map"):
        K.unpermute(xs, rm[:5], w, backend=backend)
    with pytest.raises(ValueError, match="weights_TK"):
        K.unpermute(xs, rm, w[:, :1], backend=backend)
    with pytest.raises(ValueError, match="y_ND"):
        K.unpermute(xs[None], rm, w, backend=backend)


def test_gradcheck_torch_backend():
    torch.manual_seed(0)
    T, k, D = 5, 2, 3
    experts = torch.tensor([[1, 0], [0, 2], [2, 1], [1, 0], [0, 1]])
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T * k, D, dtype=torch.float64, requires_grad=True)
    _, row_map = K.permute(x, experts, backend="torch")
    assert torch.autograd.gradcheck(lambda x: K.permute(x, experts, backend="torch")[0], (x,))
    assert torch.autograd.gradcheck(
        lambda y, w: K.unpermute(y, row_map, w, backend="torch"), (y, w)
    )


def test_outputs_allocated_empty_are_fully_written(backend, device, poison_empty):
    # unpermute's backward allocates grad_y and grad_w with empty: every element must be written
    gen = torch.Generator().manual_seed(6)
    for k in (1, 8):
        experts = _experts(200, 96, k, gen)
        x = torch.randn(200, 40, generator=gen).to(device).requires_grad_()
        w = torch.rand(200, k, generator=gen).to(device).requires_grad_()
        ours, ref = _run_pair(x, experts, w, backend)
        _check_grads(ours, ref, 1e-6, 1e-5)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the gather kernel in the interpreter"
)
def test_gather_row_offsets_are_int64():
    # row * stride overflowed int32 once N*D >= 2**31 (T=65536, k=8, D >= 5120).  Rows 2**30
    # bytes apart: row 2 sits 2**31 past the base, where int32 offsets wrap to base - 2**31 --
    # inside this (virtual, untouched except for a few pages) 4 GiB buffer, so a regression
    # shows as wrong data instead of a crash.
    pm = importlib.import_module("sigma_moe_kernels.permute")
    D, stride = 16, 2**30
    big = torch.empty(2**32 + 4096, dtype=torch.uint8)
    dst = big[2**31 :].as_strided((3, D), (stride, 1))
    src = torch.randint(
        0, 255, (3, D), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    idx = torch.tensor([2, 0, 1])
    below = big[:D].clone()
    pm._gather_rows_kernel[(1, 1)](src, idx, dst, 3, D, D, stride, BLOCK_R=4, BLOCK_D=16)
    assert torch.equal(dst, src[idx])
    assert torch.equal(big[:D], below), "a row was written at base - 2**31 (int32 wrap)"


@pytest.mark.parametrize("k", [1, 2])
def test_sort_rows_is_permute_without_the_rows(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(37, 8, generator=gen)
    experts = _experts(37, 6, k, gen)
    gather, row_map = K.sort_rows(experts)
    xs, row_map_ref = K.permute(x, experts, backend="torch")
    assert torch.equal(row_map, row_map_ref) and torch.equal(x[gather], xs)
    with pytest.raises(ValueError, match="experts_TK must be a 2-D tensor"):
        K.sort_rows(experts.reshape(-1))
