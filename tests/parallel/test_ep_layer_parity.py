"""Layer parity: SigmaMoELayer with EP over 2 gloo processes (each owns half the experts and
sees its own tokens) gives the outputs and gradients of EP=1 on one process holding all experts
(same weights) run on the concatenated tokens. fp32, tolerance 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import read_results, run_distributed, write_result

from sigma_moe.model.config import SigmaMoEConfig
from sigma_moe.model.moe import SigmaMoELayer
from sigma_moe.parallel import ExpertParallel

pytestmark = pytest.mark.distributed

TOL = 1e-6

# name: (token shapes [B, S] per rank, top-k, routing)
SCENARIOS = {
    "top1_unequal_tokens": ([(2, 7), (1, 5)], 1, "random"),
    "top2": ([(2, 6), (3, 4)], 2, "random"),
    "rank1_receives_nothing": ([(2, 5), (1, 9)], 1, "all_to_expert0"),
    "rank1_has_no_tokens": ([(2, 6), (0, 6)], 1, "random"),
}


def _cfg(ep_size: int, topk: int) -> SigmaMoEConfig:
    return SigmaMoEConfig.preset(
        "test-tiny", ep_size=ep_size, router_topk=topk, kernel_backend="torch"
    )


def _layer(ep_size: int, ep_rank: int, topk: int, routing: str) -> SigmaMoELayer:
    cfg = _cfg(ep_size, topk)
    layer = SigmaMoELayer(cfg, layer_idx=1, ep_rank=ep_rank)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if routing == "all_to_expert0":
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0  # inputs are positive below: expert 0 always wins
        else:
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    return layer


def _tokens(scenario: str, r: int):
    shapes, _, routing = SCENARIOS[scenario]
    B, S = shapes[r]
    g = torch.Generator().manual_seed(100 + r)
    D = _cfg(1, 1).hidden_size
    x = torch.randn(B, S, D, generator=g)
    if routing == "all_to_expert0":
        x = x.abs()
    return x, torch.randn(B, S, D, generator=g)


def _loss(y, g, stats, share: float):
    # Balance and z losses are means over this rank's tokens: weight them by the rank's share
    # of the tokens so the sum over ranks is the one-process loss on the concatenated batch.
    if share == 0:  # no tokens here: the layer's means over zero tokens are NaN by definition
        return (y * g).sum()
    return (y * g).sum() + share * (0.3 * stats.lb_loss + 0.2 * stats.z_loss)


def _reference(scenario: str):
    shapes, topk, routing = SCENARIOS[scenario]
    layer = _layer(1, 0, topk, routing)
    xs, gs = zip(*[_tokens(scenario, r) for r in range(len(shapes))])
    D = xs[0].shape[-1]
    x = torch.cat([t.reshape(-1, D) for t in xs]).unsqueeze(0).requires_grad_()
    g = torch.cat([t.reshape(-1, D) for t in gs]).unsqueeze(0)
    y, stats = layer(x)
    loss = _loss(y, g, stats, 1.0)
    loss.backward()
    return layer, x, y.detach(), loss.detach(), stats


def _worker(rank: int, world: int, scenario: str, out_dir: str) -> None:
    from deepspeed.utils import groups

    shapes, topk, routing = SCENARIOS[scenario]
    layer = _layer(world, rank, topk, routing)
    # The groups deepspeed.initialize would create (the layer's own override does it).
    layer.set_deepspeed_parallelism()
    layer.ep = ExpertParallel(groups._get_expert_parallel_group(f"ep_size_{world}"), 8)
    layer.dp_group = groups._get_data_parallel_group()

    x, g = _tokens(scenario, rank)
    x.requires_grad_()
    T = [B * S for B, S in shapes]
    y, stats = layer(x)
    loss = _loss(y, g, stats, T[rank] / sum(T))
    loss.backward()

    ref_layer, ref_x, ref_y, ref_loss, _ = _reference(scenario)
    off = sum(T[:rank])
    D = x.shape[-1]
    ref_y_r = ref_y.reshape(-1, D)[off : off + T[rank]]
    ref_dx_r = ref_x.grad.reshape(-1, D)[off : off + T[rank]]
    total = loss.detach().clone()
    dist.all_reduce(total)
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # DP would average it; the sum is the one-process gradient
    L = 8 // world
    res = {
        "out": (y.detach().reshape(-1, D) - ref_y_r).abs().max().item() if T[rank] else 0.0,
        "dx": (x.grad.reshape(-1, D) - ref_dx_r).abs().max().item() if T[rank] else 0.0,
        # relative: the loss is a sum over ~1000 products
        "loss": abs(total.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1.0),
        # relative to the gradient's scale: the sum over ranks reorders a ~100-term sum
        "d_router": (router_grad - ref_layer.router.weight.grad).abs().max().item()
        / max(ref_layer.router.weight.grad.abs().max().item(), 1.0),
    }
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        mine = getattr(layer.experts, name)
        ref = getattr(ref_layer.experts, name)
        assert torch.equal(mine.detach(), ref.detach()[rank * L : (rank + 1) * L])
        res[f"d_{name}"] = (mine.grad - ref.grad[rank * L : (rank + 1) * L]).abs().max().item()
    res["local_tokens"] = int(sum(stats.tokens_per_expert_E[rank * L : (rank + 1) * L]))
    write_result(out_dir, rank, res)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_layer_ep2_matches_ep1(scenario, tmp_path):
    run_distributed(_worker, 2, scenario, str(tmp_path), init="deepspeed", retry_on_signal=True)
    for r, res in enumerate(read_results(tmp_path, 2)):
        print(f"{scenario} rank {r}: max|Δ| {res}")
        for k, v in res.items():
            if k != "local_tokens":
                assert v <= TOL, (k, v)
