"""The attention block's fused paths against their plain torch formulas: the hand-written
RMSNorm backward, and one q|k|v GEMM with one norm and one RoPE for q and k together."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sigma_moe.model.attention import Attention, apply_rope, rms_norm, rope_cache
from sigma_moe.model.config import SigmaMoEConfig


def _rms_ref(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize(
    "shape, wshape, strided",
    [((3, 5, 7), (7,), False), ((2, 3, 4, 5), (4, 5), True), ((1, 1), (1,), False)],
)
def test_rms_norm_matches_autograd_on_outputs_and_every_gradient(shape, wshape, strided):
    torch.manual_seed(0)
    base = torch.randn(*shape[:-1], 2 * shape[-1])
    # strided: a non-contiguous view, as q|k split from the fused projection
    x = (base[..., 1::2] if strided else base[..., : shape[-1]].contiguous()).requires_grad_()
    assert x.is_contiguous() is not strided
    w = torch.randn(*wshape, requires_grad=True)
    dy = torch.randn(*shape)
    y = rms_norm(x, w, 1e-6)
    assert torch.equal(y, _rms_ref(x, w, 1e-6))  # the same ops in the same order
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(_rms_ref(x64, w64, 1e-6), [x64, w64], dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5)


def _attention_ref(att: Attention, x, rope):
    """The block as three projections, two norms and two RoPEs (the pre-2026-12-02 code)."""
    B, S, _ = x.shape
    H, Hk, d = att.n_heads, att.n_kv, att.head_dim
    q = _rms_ref(att.q_proj(x).view(B, S, H, d), att.q_norm.weight, att.q_norm.eps)
    k = _rms_ref(att.k_proj(x).view(B, S, Hk, d), att.k_norm.weight, att.k_norm.eps)
    v = att.v_proj(x).view(B, S, Hk, d).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return att.o_proj(y.transpose(1, 2).reshape(B, S, H * d))


def test_fused_attention_equals_three_projections_and_its_gradients():
    torch.manual_seed(0)
    cfg = SigmaMoEConfig.preset("test-tiny")
    att = Attention(cfg)
    with torch.no_grad():  # non-trivial norm weights, different for q and k
        att.q_norm.weight.uniform_(0.5, 1.5)
        att.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 13, cfg.hidden_size, requires_grad=True)
    rope = rope_cache(13, cfg.head_dim, cfg.rope_theta, x.device)
    params = [x, *att.parameters()]
    y = att(x, rope)
    y_ref = _attention_ref(att, x, rope)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(y_ref, params, dy)
    for (name, _), g, r in zip([("x", x), *att.named_parameters()], got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
