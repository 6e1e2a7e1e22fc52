"""The per-expert loop kept for `sigma-moe bench kernels` must compute the same forward and
gradients as the reference (a move once dropped its `return`, and the bench crashed on CPU)."""

from __future__ import annotations

import torch

import sigma_moe_kernels as K
from sigma_moe.bench.kernels import _AltGroupedSwiGLU
from sigma_moe.bench.swiglu_loop import bwd_torch_loop, fwd_torch_loop


def test_loop_matches_reference_forward_and_grads():
    gen = torch.Generator().manual_seed(0)
    N, D, F, E = 40, 16, 8, 6
    counts = torch.tensor([9, 0, 13, 0, 0, 18])  # empty experts in the middle and in a run
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    ws = [torch.randn(*s, generator=gen, dtype=torch.float64) * 0.3 for s in ((E, D, F),) * 2]
    ws.append(torch.randn(E, F, D, generator=gen, dtype=torch.float64) * 0.3)
    g = torch.randn(N, D, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (
        K.reference.grouped_swiglu,
        lambda *a: _AltGroupedSwiGLU.apply(*a, fwd_torch_loop, bwd_torch_loop),
    ):
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        y = fn(leaves[0], counts, *leaves[1:])
        y.backward(g)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for ref, loop in zip(*grads):
        torch.testing.assert_close(loop, ref)
    assert grads[1][2][1].abs().sum() == 0  # an empty expert's weight grad is zero
