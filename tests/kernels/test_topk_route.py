"""topk_route: outputs and gradients vs the reference on every backend."""

from __future__ import annotations

import pytest
import torch

import sigma_moe_kernels as K
from sigma_moe_kernels._backend import resolve_backend

TS = [1, 7, 128, 1031]
ES = [1, 8, 96]
KS = [1, 2, 8]
CASES = [(T, E, k) for T in TS for E in ES for k in KS if k <= E]


@pytest.mark.parametrize("T,E,k", CASES)
def test_topk_route_matches_reference(T, E, k, backend, device):
    torch.manual_seed(T * 131 + E * 7 + k)
    logits = (torch.randn(T, E) * 3).to(device).requires_grad_()
    logits_ref = logits.detach().cpu().requires_grad_()
    out = K.topk_route(logits, k, backend=backend)
    ref = K.reference.topk_route(logits_ref, k)
    _compare(out, ref, logits, logits_ref)


@pytest.mark.parametrize("T,E,k", [(7, 8, 2), (128, 96, 8), (1031, 96, 2), (5, 3, 3)])
def test_topk_route_normalize(T, E, k, backend, device):
    torch.manual_seed(0)
    logits = torch.randn(T, E).to(device).requires_grad_()
    logits_ref = logits.detach().cpu().requires_grad_()
    out = K.topk_route(logits, k, normalize=True, backend=backend)
    ref = K.reference.topk_route(logits_ref, k, normalize=True)
    _compare(out, ref, logits, logits_ref)
    torch.testing.assert_close(out[0].sum(-1).detach().cpu(), torch.ones(T))


def _compare(out, ref, logits, logits_ref, atol=1e-6, rtol=1e-5):
    w, e, cnt, ps = out
    T, E = logits.shape
    k = ref[1].shape[1]
    assert w.dtype == torch.float32 and ps.dtype == torch.float32
    assert e.dtype == torch.int64 and cnt.dtype == torch.int64
    assert tuple(w.shape) == tuple(e.shape) == (T, k)
    assert tuple(cnt.shape) == tuple(ps.shape) == (E,)
    torch.testing.assert_close(e.cpu(), ref[1])
    torch.testing.assert_close(cnt.cpu(), ref[2])
    torch.testing.assert_close(w.detach().cpu(), ref[0].detach(), atol=atol, rtol=rtol)
    # prob_sum adds up to T probabilities: fp32 summation order differs -> scale atol by T
    torch.testing.assert_close(ps.detach().cpu(), ref[3].detach(), atol=atol * max(T, 1), rtol=rtol)
    gen = torch.Generator().manual_seed(1)
    gw = torch.randn(T, k, generator=gen)
    gp = torch.randn(E, generator=gen)
    (g,) = torch.autograd.grad((w * gw.to(w.device)).sum() + (ps * gp.to(ps.device)).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref[0] * gw).sum() + (ref[3] * gp).sum(), logits_ref)
    assert g.dtype == logits.dtype
    torch.testing.assert_close(g.cpu().float(), g_ref.float(), atol=1e-5, rtol=1e-4)


def test_ties_go_to_lower_index(backend, device):
    # rows: all equal; pairs of equal maxima; equal values after the first pick
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, 2.0, 0.0, 2.0],
            [3.0, 1.0, 3.0, 1.0, 1.0],
            [-1.0, 5.0, -1.0, 5.0, -1.0],
        ],
        device=device,
    )
    _, e, cnt, _ = K.topk_route(logits, 3, backend=backend)
    expected = torch.tensor([[0, 1, 2], [1, 2, 4], [0, 2, 1], [1, 3, 0]])
    torch.testing.assert_close(e.cpu(), expected)
    torch.testing.assert_close(cnt.cpu(), torch.tensor([3, 4, 3, 1, 1]))
    _, e1, _, _ = K.topk_route(logits, 1, backend=backend)
    torch.testing.assert_close(e1.cpu().flatten(), torch.tensor([0, 1, 0, 1]))
    # a large all-tied batch (exercises several row blocks)
    z = torch.zeros(1031, 96, device=device)
    _, ez, cz, _ = K.topk_route(z, 8, backend=backend)
    assert (ez.cpu() == torch.arange(8)).all()
    assert cz[:8].cpu().tolist() == [1031] * 8 and cz[8:].sum().item() == 0


def test_all_tokens_one_expert_and_empty_experts(backend, device):
    logits = torch.full((300, 96), -5.0)
    logits[:, 17] = 10.0
    logits = logits.to(device).requires_grad_()
    logits_ref = logits.detach().cpu().requires_grad_()
    out = K.topk_route(logits, 1, backend=backend)
    ref = K.reference.topk_route(logits_ref, 1)
    assert out[2].cpu()[17].item() == 300 and out[2].sum().item() == 300
    _compare(out, ref, logits, logits_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype, backend, device):
    # The router computes in fp32 from the (exactly representable) low-precision logits, so the
    # result equals the reference on the same values to fp32 accuracy; the logits gradient is
    # rounded once to the logits dtype at the end: bf16 has an 8-bit mantissa (rel. step 2^-8 =
    # 0.4%), fp16 11 bits, hence rtol 1e-2 / atol 1e-3 on gradients of size O(1).
    torch.manual_seed(0)
    logits = (torch.randn(130, 96) * 2).to(dtype).to(device).requires_grad_()
    logits_ref = logits.detach().cpu().float().requires_grad_()
    out = K.topk_route(logits, 2, backend=backend)
    ref = K.reference.topk_route(logits_ref, 2)
    torch.testing.assert_close(out[1].cpu(), ref[1])
    torch.testing.assert_close(out[0].detach().cpu(), ref[0].detach(), atol=1e-6, rtol=1e-5)
    gw = torch.randn(130, 2)
    (g,) = torch.autograd.grad((out[0] * gw.to(device)).sum() + out[3].sum(), logits)
    (g_ref,) = torch.autograd.grad((ref[0] * gw).sum() + ref[3].sum(), logits_ref)
    assert g.dtype == dtype
    torch.testing.assert_close(g.cpu().float(), g_ref, atol=1e-3, rtol=1e-2)


def test_zero_tokens(backend, device):
    logits = torch.zeros(0, 8, device=device, requires_grad=True)
    w, e, cnt, ps = K.topk_route(logits, 2, backend=backend)
    assert w.shape == (0, 2) and e.shape == (0, 2)
    assert cnt.tolist() == [0] * 8 and ps.tolist() == [0.0] * 8
    (w.sum() + ps.sum()).backward()
    assert logits.grad.shape == (0, 8)


@pytest.mark.parametrize("k", [0, -1, 9, 100])
def test_bad_k_raises(k, backend, device):
    with pytest.raises(ValueError, match="k"):
        K.topk_route(torch.randn(4, 8, device=device), k, backend=backend)


def test_bad_args_raise(backend, device):
    with pytest.raises(ValueError, match="logits_TE"):
        K.topk_route(torch.randn(4, 8, 2, device=device), 1, backend=backend)
    with pytest.raises(ValueError, match="logits_TE"):
        K.topk_route(torch.ones(4, 8, dtype=torch.int64, device=device), 1, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        K.topk_route(torch.randn(4, 8, device=device), 1, backend="cuda")


def test_interpret_without_env_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("interpret", torch.zeros(1))


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


def test_gradcheck_torch_backend():
    # The contract fixes the softmax in float32, so finite differences of a float64 input see
    # fp32 rounding (~1e-7 relative): use eps 1e-3 and atol 1e-3 instead of the fp64 defaults.
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):

        def f(lg, normalize=normalize):
            w, _, _, ps = K.topk_route(lg, 2, normalize=normalize, backend="torch")
            return w, ps

        assert torch.autograd.gradcheck(f, (logits,), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_outputs_allocated_empty_are_fully_written(backend, device, poison_empty):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 96, generator=gen)
    for k in (1, 8):
        out = K.topk_route(logits.to(device), k, backend=backend)
        ref = K.reference.topk_route(logits, k)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=1e-5)
