"""torch.compile traces the MoE layer through the custom ops (fake + autograd registrations)."""

from __future__ import annotations

import pytest
import torch

import sigma_moe_kernels as K


def _layer(x, w_router, w_gate, w_up, w_down, k):
    w, experts, counts, prob_sum = K.topk_route(x @ w_router, k, backend="torch")
    xs, row_map = K.permute(x, experts, backend="torch")
    ys = K.grouped_swiglu(xs, counts, w_gate, w_up, w_down, backend="torch")
    return K.unpermute(ys, row_map, w, backend="torch"), prob_sum


def _args():
    g = torch.Generator().manual_seed(0)
    T, D, F, E = 64, 32, 24, 8
    shapes = [(T, D), (D, E), (E, D, F), (E, D, F), (E, F, D)]
    return [(torch.randn(*s, generator=g) * 0.3).requires_grad_() for s in shapes]


def _check(compile_backend):
    args = _args()
    for k in (1, 2):
        y, ps = _layer(*args, k)
        g_eager = torch.autograd.grad((y**2).sum() + ps.sum(), args)
        compiled = torch.compile(_layer, backend=compile_backend, fullgraph=True, dynamic=False)
        y2, ps2 = compiled(*args, k)
        g_comp = torch.autograd.grad((y2**2).sum() + ps2.sum(), args)
        torch.testing.assert_close(y2, y)
        torch.testing.assert_close(ps2, ps)
        for a, b in zip(g_comp, g_eager):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_aot_eager_matches_eager():
    # aot_eager runs dynamo + AOTAutograd (the fake kernels and the autograd registrations) but
    # not inductor's codegen: seconds instead of a minute on this 2-core machine.
    torch._dynamo.reset()
    _check("aot_eager")


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    _check("inductor")
