"""Balancing over 2 gloo processes vs one process on the concatenated batch (issue 13).

The Sigma-MoE-Tiny fork's 2025-07 fix (#68) found `torch.distributed.nn.all_reduce` had left
the expert counts of its global-batch loss un-reduced; these checks fail on such a bug:
- the global-batch balance loss and its router gradient (summed over ranks, each rank's loss
  weighted by its share of the tokens) equal the one-process values; the micro-batch loss's
  do not;
- the aux-loss-free bias after `end_step_balance` equals the one-process bias, and differs
  from a bias stepped from this rank's counts alone;
- EP=2 with shared experts and a router bias gives the EP=1 outputs and gradients.
One spawn runs every scenario (the process start dominates); the tests read its results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import read_results, run_distributed, write_result

from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.model.config import SigmaMoEConfig
from sigma_moe.model.moe import SigmaMoELayer
from sigma_moe.parallel import ExpertParallel

pytestmark = pytest.mark.distributed

TOL = 1e-6
D = 64  # test-tiny hidden size


def _cfg(**kw) -> SigmaMoEConfig:
    return SigmaMoEConfig.preset("test-tiny", kernel_backend="torch", **kw)


def _x(rank: int, B: int = 2, S: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + rank)
    # rank 1's tokens lean elsewhere, so its micro-batch counts differ from rank 0's
    return torch.randn(B, S, D, generator=g) + 0.8 * rank


def _layer(ep_size: int = 1, ep_rank: int = 0, **kw) -> SigmaMoELayer:
    layer = SigmaMoELayer(_cfg(ep_size=ep_size, **kw), layer_idx=1, ep_rank=ep_rank)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
        if layer.router_bias_E is not None:
            layer.router_bias_E.copy_(0.3 * torch.randn(8, generator=g))
        if layer.shared is not None:
            for p in layer.shared.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))


# --------------------------------------------------------------------------- scenarios


def _loss_over_dp(rank: int, world: int, lb_type: str) -> dict:
    """Σ_r share_r · lb_loss_r and its router gradient vs one process on all tokens."""
    layer = _layer(lb_loss_type=lb_type)
    layer.dp_group = dist.group.WORLD
    _, stats = layer(_x(rank))
    loss = stats.lb_loss / world  # equal token counts: share 1/2
    loss.backward()
    total, grad = loss.detach().clone(), layer.router.weight.grad.clone()
    dist.all_reduce(total)
    dist.all_reduce(grad)
    ref = _layer(lb_loss_type=lb_type)
    _, ref_stats = ref(torch.cat([_x(r) for r in range(world)]))
    ref_stats.lb_loss.backward()
    return {
        "loss": _rel(total, ref_stats.lb_loss.detach()),
        "grad": _rel(grad, ref.router.weight.grad),
    }


def _bias_over_dp(rank: int, world: int) -> dict:
    cfg = _cfg(router_bias_update="aux_free", bias_update_rate=0.01)
    ids = torch.randint(0, 512, (2 * world, 16), generator=torch.Generator().manual_seed(9))

    def build():
        torch.manual_seed(0)  # the same weights in every process and for every copy
        return SigmaMoEForCausalLM(cfg)

    def counts(model, x):
        return torch.stack([s.tokens_per_expert_E for s in model(x).moe_stats]).double()

    model = build()
    model.set_dp_group(dist.group.WORLD)
    mine = ids[2 * rank : 2 * rank + 2]
    c_local = counts(model, mine)
    c_global = model.end_step_balance(c_local)
    local_only = build()
    local_only.end_step_balance(c_local)  # no group: this rank's counts alone
    ref = build()
    c_ref = ref.end_step_balance(counts(ref, ids))

    def biases(m):
        return torch.stack([blk.moe.router_bias_E for blk in m.layers])

    return {
        "counts_equal": bool(torch.equal(c_global, c_ref)),
        "bias_equal": bool(torch.equal(biases(model), biases(ref))),
        "local_differs": bool(not torch.equal(biases(local_only), biases(ref))),
        "bias_moved": float(biases(ref).abs().sum()),
        "hand": bool(
            torch.equal(biases(ref)[0], 0.01 * torch.sign(c_ref[0].mean() - c_ref[0]).float())
        ),
    }


def _ep_parity(rank: int, world: int) -> dict:
    """EP=2 (half the experts each, own tokens) vs EP=1 on the concatenation, with 2 shared
    experts and a nonzero router bias."""
    from deepspeed.utils import groups

    kw = dict(num_shared_experts=2, router_bias_update="aux_free")
    layer = _layer(world, rank, **kw)
    layer.set_deepspeed_parallelism()
    layer.ep = ExpertParallel(groups._get_expert_parallel_group(f"ep_size_{world}"), 8)
    layer.dp_group = groups._get_data_parallel_group()
    xs = [_x(r, B=r + 1, S=5) for r in range(world)]  # unequal token counts
    T = [x.shape[0] * x.shape[1] for x in xs]
    x = xs[rank].clone().requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + rank))
    y, stats = layer(x)
    ((y * gy).sum() + T[rank] / sum(T) * stats.lb_loss).backward()

    ref = _layer(1, 0, **kw)
    x_ref = torch.cat([t.reshape(-1, D) for t in xs])[None].requires_grad_()
    g_ref = torch.cat(
        [
            torch.randn(t.shape, generator=torch.Generator().manual_seed(7 + r))
            for r, t in enumerate(xs)
        ]  # fmt: skip
    ).reshape(1, -1, D)
    y_ref, s_ref = ref(x_ref)
    ((y_ref * g_ref).sum() + s_ref.lb_loss).backward()
    off, n = sum(T[:rank]), T[rank]
    res = {
        "out": _rel(y.detach().reshape(-1, D), y_ref.detach()[0, off : off + n]),
        "dx": _rel(x.grad.reshape(-1, D), x_ref.grad[0, off : off + n]),
    }
    grads = {"router": layer.router.weight.grad.clone()}
    grads.update({n_: p.grad.clone() for n_, p in layer.shared.named_parameters()})
    for name, g in grads.items():
        dist.all_reduce(g)  # DP would average; the sum is the one-process gradient
        want = ref.router.weight.grad if name == "router" else ref.shared.get_parameter(name).grad
        res[f"d_{name}"] = _rel(g, want)
    L = 8 // world
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        want = getattr(ref.experts, name).grad[rank * L : (rank + 1) * L]
        res[f"d_{name}"] = _rel(getattr(layer.experts, name).grad, want)
    res["local_tokens"] = int(stats.tokens_per_expert_E[rank * L : (rank + 1) * L].sum())
    return res


def _worker(rank: int, world: int, out_dir: str) -> None:
    write_result(
        out_dir,
        rank,
        {
            "global_batch": _loss_over_dp(rank, world, "global_batch"),
            "micro_batch": _loss_over_dp(rank, world, "micro_batch"),
            "bias": _bias_over_dp(rank, world),
            "ep": _ep_parity(rank, world),
        },
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance_dist")
    run_distributed(_worker, 2, str(out), init="deepspeed", retry_on_signal=True)
    return read_results(out, 2)


def test_global_batch_loss_sums_counts_over_dp(results):
    for r, res in enumerate(results):
        print(f"rank {r}: {res['global_batch']} (micro-batch: {res['micro_batch']})")
        assert res["global_batch"]["loss"] <= TOL and res["global_batch"]["grad"] <= TOL
        # the micro-batch loss (each rank's own counts) is measurably not the global one
        assert res["micro_batch"]["loss"] > 1e-3 and res["micro_batch"]["grad"] > 1e-2


def test_bias_update_uses_the_global_counts(results):
    for res in results:
        b = res["bias"]
        assert b["counts_equal"] and b["bias_equal"] and b["hand"], b
        assert b["local_differs"] and b["bias_moved"] > 0, b


def test_ep2_matches_ep1_with_shared_experts_and_bias(results):
    for r, res in enumerate(results):
        ep = res["ep"]
        print(f"rank {r}: {ep}")
        assert ep["local_tokens"] > 0  # both EP ranks' experts got tokens: the exchange ran
        for k, v in ep.items():
            if k != "local_tokens":
                assert v <= 1e-5, (k, v)
