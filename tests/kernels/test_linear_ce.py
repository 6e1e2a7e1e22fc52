"""linear_cross_entropy: per-token loss and both gradients (h and the head weight) against the
plain full-logits reference, on chunk sizes that do and do not divide the rows."""

from __future__ import annotations

import pytest
import torch

import sigma_moe_kernels as K


def _case(T, D, V, dtype=torch.float32, seed=0, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    w = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype)
    labels = torch.randint(0, V, (T,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = -100
    g = torch.rand(T, generator=gen) * 3  # per-token upstream weights (as Rho-1 gives)
    return h, w, labels, g


def _loss_and_grads(fn, h, w, labels, g, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    dh, dw = torch.autograd.grad((loss * g).sum(), [h, w])
    return loss, dh, dw


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize(
    "T, D, V, chunk",
    [(37, 24, 50, 8), (64, 16, 33, 64), (5, 8, 7, 1), (130, 32, 300, 512), (96, 40, 129, 31)],
)
def test_matches_reference_loss_and_grads(T, D, V, chunk, keep):
    h, w, labels, g = _case(T, D, V, seed=T + V)
    ref = _loss_and_grads(K.reference.linear_cross_entropy, h, w, labels, g)
    got = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g, chunk=chunk, keep=keep)
    for name, a, b in zip(("loss", "d_h", "d_w"), got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    assert bool((got[0][labels == -100] == 0).all())  # ignored tokens: loss 0, no gradient
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_gradcheck_float64(keep):
    h, w, labels, _ = _case(11, 6, 9, dtype=torch.float64, seed=3, ignore_every=4)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: K.linear_cross_entropy(a, b, labels, chunk=4, keep=keep), (h, w)
    )


def test_keep_backward_twice_with_retain_graph():
    """The kept log-softmax is not overwritten by the backward: a second one agrees."""
    h, w, labels, g = _case(20, 8, 30, seed=5)
    h.requires_grad_()
    loss = (K.linear_cross_entropy(h, w, labels, chunk=8, keep=True) * g).sum()
    (d1,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (d2,) = torch.autograd.grad(loss, [h])
    assert torch.equal(d1, d2)


def test_bf16_inputs_keep_fp32_loss():
    h, w, labels, g = _case(40, 16, 64, dtype=torch.bfloat16, seed=1)
    loss, dh, dw = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g, chunk=16)
    ref = _loss_and_grads(K.reference.linear_cross_entropy, h, w, labels, g)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw.float(), ref[2].float(), atol=2e-2, rtol=2e-2)


def test_all_labels_ignored_gives_zero_loss_and_grads():
    h, w, labels, g = _case(9, 4, 6, seed=2)
    labels[:] = -100
    loss, dh, dw = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g, chunk=4)
    assert float(loss.detach().abs().max()) == 0.0
    assert float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ("label", r"labels must be -100 or in \[0, 7\).*\[7\]"),
        ("shape", r"must be \[T, D\] and \[V, D\]"),
        ("labels_len", r"labels_T \(4,\) must be \[5\]"),
        ("chunk", "chunk must be >= 1"),
    ],
)
def test_bad_input_is_named(bad, match):
    h, w, labels, _ = _case(5, 4, 7, ignore_every=0)
    kw = {}
    if bad == "label":
        labels[2] = 7
    elif bad == "shape":
        w = w[:, :3]
    elif bad == "labels_len":
        labels = labels[:4]
    else:
        kw["chunk"] = 0
    with pytest.raises(ValueError, match=match):
        K.linear_cross_entropy(h, w, labels, **kw)


def test_default_path_by_logits_size(monkeypatch):
    """chunk=None: the unchunked reference (bitwise) under the budget, chunks above it."""
    import sigma_moe_kernels.linear_ce as lce

    h, w, labels, g = _case(40, 8, 30, seed=4)
    ref = _loss_and_grads(K.reference.linear_cross_entropy, h, w, labels, g)
    small = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g)
    for a, b in zip(small, ref):
        assert torch.equal(a, b)
    calls = []
    monkeypatch.setattr(lce, "UNCHUNKED_MAX_BYTES", 40 * 30 * 4)  # exactly the logits: chunked
    monkeypatch.setattr(lce, "CHUNK_ROWS", 16)
    orig = lce._LinearCE.apply
    monkeypatch.setattr(lce._LinearCE, "apply", lambda *a: calls.append(a[-2:]) or orig(*a))
    big = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g)
    monkeypatch.setattr(lce, "KEEP_MAX_BYTES", 40 * 30 * 4 - 1)
    huge = _loss_and_grads(K.linear_cross_entropy, h, w, labels, g)
    assert calls == [(16, True), (16, False)]  # chunks; the log-softmax kept, then recomputed
    for a, b, c in zip(big, huge, ref):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b, c, atol=2e-5, rtol=1e-4)
