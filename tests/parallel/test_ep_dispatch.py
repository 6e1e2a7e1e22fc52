"""ExpertParallel.dispatch / combine across gloo processes vs the same computation without EP:
outputs, input gradients and expert-weight gradients; uneven splits, a rank sending nothing, a
rank receiving nothing, unequal token counts per rank, L = 1 and bf16 rows."""

from __future__ import annotations

import pytest
import torch
from _dist import read_results, run_distributed, write_result

from sigma_moe.parallel import ExpertParallel

pytestmark = pytest.mark.distributed

D = 8

# name: (ep_size, num_experts, tokens per rank, experts that may be picked (None = all))
SCENARIOS = {
    "uneven": (2, 6, [37, 5], None),
    "rank_sends_nothing": (2, 6, [23, 0], None),
    "rank_receives_nothing": (2, 6, [19, 11], [0, 1, 2]),  # rank 1 owns 3..5: gets no rows
    "three_ranks_empty_expert": (3, 6, [13, 29, 7], [0, 1, 3, 4, 5]),
    "one_local_expert": (2, 2, [9, 17], None),
}


def _rank_data(scenario: str, s: int, dtype=torch.float32):
    """Rank s's rows, sorted by expert (as K.permute leaves them), with their experts and the
    upstream gradient; the same on every process."""
    P, E, n_tokens, allowed = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(1000 + s)
    N = n_tokens[s]
    pool = torch.tensor(allowed if allowed is not None else list(range(E)))
    experts_N = pool[torch.randint(len(pool), (N,), generator=g)].sort().values
    x_ND = torch.randn(N, D, generator=g).to(dtype)
    g_ND = torch.randn(N, D, generator=g).to(dtype)
    counts_E = torch.bincount(experts_N, minlength=E).to(torch.int64)
    return x_ND, experts_N, counts_E, g_ND


def _weights(E: int):
    return torch.randn(E, D, D, generator=torch.Generator().manual_seed(7)) / D**0.5


def _expert_fn(x_MD, w_DD):
    return torch.tanh(x_MD @ w_DD)


def _reference(scenario: str):
    """No EP: every rank's rows through the full set of experts, one process."""
    P, E, _, _ = SCENARIOS[scenario]
    W = _weights(E).requires_grad_()
    ys, xs = [], []
    total = 0.0
    for s in range(P):
        x_ND, experts_N, _, g_ND = _rank_data(scenario, s)
        x_ND.requires_grad_()
        y_ND = torch.zeros_like(x_ND)
        for e in range(E):
            m = experts_N == e
            y_ND = torch.where(m[:, None], _expert_fn(x_ND, W[e]), y_ND)
        total = total + (y_ND * g_ND).sum()
        ys.append(y_ND)
        xs.append(x_ND)
    total.backward()
    return [y.detach() for y in ys], [x.grad for x in xs], W.grad


def _worker(rank: int, world: int, scenario: str, out_dir: str, device: str = "cpu") -> None:
    P, E, _, _ = SCENARIOS[scenario]
    ep = ExpertParallel(torch.distributed.group.WORLD, E)
    L = E // P
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    x_ND, experts_N, counts_E, g_ND = (t.to(dev) for t in _rank_data(scenario, rank))
    x_ND.requires_grad_()
    W_local = _weights(E)[rank * L : (rank + 1) * L].clone().to(dev).requires_grad_()

    x_local_MD, counts_L, ctx = ep.dispatch(x_ND, counts_E)
    assert counts_L.dtype == torch.int64 and counts_L.shape == (L,)

    # The rows each local expert receives: source rank order, then the source's order.
    expect = []
    for le in range(L):
        for s in range(P):
            xs, es, _, _ = _rank_data(scenario, s)
            expect.append(xs[es == rank * L + le])
    expect_MD = torch.cat(expect)
    assert torch.equal(x_local_MD.detach().cpu(), expect_MD), "rows not grouped by local expert"
    assert counts_L.tolist() == [
        sum(int((_rank_data(scenario, s)[1] == rank * L + le).sum()) for s in range(P))
        for le in range(L)
    ]

    y_local = [
        _expert_fn(chunk, W_local[le])
        for le, chunk in enumerate(torch.split(x_local_MD, counts_L.tolist()))
    ]
    y_local_MD = torch.cat(y_local) if y_local else x_local_MD * 0
    y_ND = ep.combine(y_local_MD, ctx)
    (y_ND * g_ND).sum().backward()

    ref_y, ref_dx, ref_dW = _reference(scenario)
    res = {
        "out": (y_ND.detach().cpu() - ref_y[rank]).abs().max().item() if y_ND.numel() else 0.0,
        "dx": (x_ND.grad.cpu() - ref_dx[rank]).abs().max().item() if x_ND.numel() else 0.0,
        "dW": (W_local.grad.cpu() - ref_dW[rank * L : (rank + 1) * L]).abs().max().item(),
    }
    # bf16 rows go through the same exchange unchanged (forward only).
    xb, _, cb, _ = (t.to(dev) for t in _rank_data(scenario, rank, torch.bfloat16))
    xb_local, _, ctxb = ep.dispatch(xb, cb)
    assert xb_local.dtype == torch.bfloat16
    assert torch.equal(ep.combine(xb_local, ctxb), xb)
    write_result(out_dir, rank, res)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_dispatch_combine_matches_no_ep(scenario, tmp_path):
    P = SCENARIOS[scenario][0]
    run_distributed(_worker, P, scenario, str(tmp_path))
    for r, res in enumerate(read_results(tmp_path, P)):
        print(f"{scenario} rank {r}: max|Δ| {res}")
        assert res["out"] <= 1e-6 and res["dx"] <= 1e-6 and res["dW"] <= 1e-5, res


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", ["uneven", "rank_receives_nothing"])
def test_dispatch_combine_nccl(scenario, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    run_distributed(_worker, 2, scenario, str(tmp_path), "cuda", init="nccl")
    for res in read_results(tmp_path, 2):
        assert res["out"] <= 1e-5 and res["dx"] <= 1e-5 and res["dW"] <= 1e-4, res
