"""`sigma-moe bench layer`: the skewed-routing row really routes a quarter of the tokens to one
expert, and the quick run reports it against the balanced layer."""

from __future__ import annotations

import torch

import sigma_moe_kernels as K
from sigma_moe.bench.layer import KernelMoE, run


def test_skewed_layer_sends_the_share_to_expert_0(monkeypatch):
    torch.manual_seed(0)
    T, E = 400, 16
    seen = []
    route = K.topk_route
    monkeypatch.setattr(K, "topk_route", lambda *a, **kw: seen.append(route(*a, **kw)) or seen[-1])
    x = torch.randn(T, 32)
    for skew in (0.0, 0.25):
        y, aux = KernelMoE(32, 16, E, 1, skew=skew)(x)
        assert y.shape == (T, 32) and torch.isfinite(aux)
    (_, _, balanced, _), (_, experts, skewed, _) = seen
    assert bool((experts[:100, 0] == 0).all())  # the first quarter of the tokens
    assert int(skewed[0]) >= 100 and int(balanced[0]) < 100


def test_quick_run_has_the_skewed_row():
    out = run(quick=True, repeats=1, topk=(1,), peers=False, skew=0.25)
    names = [r["layer"] for r in out["rows"]]
    assert any("holds 25% of tokens" in n for n in names), names
    skewed = next(r for r in out["rows"] if "holds" in r["layer"])
    assert skewed["x_balanced_time"] > 0 and skewed["median_ms"] > 0
