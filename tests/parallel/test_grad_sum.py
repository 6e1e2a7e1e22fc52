"""GradSum (sigma_moe/parallel/grad_sum.py) against DeepSpeed's own ZeRO-0 reduction on the same
per-rank gradients: bitwise equal at dp = 2 (EP=2, expert-data-parallel group of 1) and at
dp = 4 (EP=2 x EDP=2: the expert gradients are summed over their pair of replicas too), over
gloo and over DeepSpeed's shared-memory all-reduce (every rank on one machine: LOCAL_SIZE)."""

from __future__ import annotations

import deepspeed
import pytest
import torch
from _dist import read_results, run_distributed, write_result

from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM
from sigma_moe.parallel import ep_rank_for, grad_sum, moe_param_groups, wire_expert_parallel
from sigma_moe.parallel.grad_sum import GradSum, can_sum_gradients
from sigma_moe.train.engine import shm_has_room

pytestmark = pytest.mark.distributed


def _engine(ep: int, ds_extra: dict | None = None):
    cfg = SigmaMoEConfig.preset("test-tiny", ep_size=ep, kernel_backend="torch")
    torch.manual_seed(0)
    model = SigmaMoEForCausalLM(cfg, ep_rank=ep_rank_for(ep))
    opt = torch.optim.AdamW(moe_param_groups(model, 0.0), lr=1e-3)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        **(ds_extra or {}),
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    wire_expert_parallel(engine.module, ep)
    return engine


def _rank_grads(engine, rank: int) -> list[torch.Tensor]:
    """Awkward per-rank gradients: different on every rank, of very different sizes."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for p in engine.module.parameters():
        out.append(torch.randn(p.shape, generator=gen) * (1 + rank) ** 3)
    return out


def _worker(rank: int, world: int, ep: int, out_dir: str, shm: bool) -> None:
    engine = _engine(ep)
    params = list(engine.module.parameters())
    grads = _rank_grads(engine, rank)
    # the first expert parameter gets no gradient at all (an expert that saw no token)
    none_at = next(i for i, p in enumerate(params) if getattr(p, "allreduce", True) is False)
    # DeepSpeed: the loss was scaled by dp, its reduction sums and divides by dp.
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i == none_at else g.clone()
    engine.buffered_allreduce_fallback()
    want = [p.grad.clone() for p in params]
    # GradSum: the loss was scaled by 1, so the same gradients arrive divided by dp.
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i == none_at else g / world
    assert can_sum_gradients(engine)
    if shm:  # many pieces, the last one short (the demo's 12 MB goes in 2 MB pieces)
        grad_sum.SHM_PIECE_NUMEL = 1001
    summer = GradSum(engine.module)
    # the dense bucket (the whole world) goes through shared memory exactly when it is mapped
    assert summer.shm == [shm] + [False] * (len(summer.buckets) - 1), summer.shm
    summer()
    got = [p.grad for p in params]
    mismatched = [i for i, (a, b) in enumerate(zip(want, got)) if not torch.equal(a, b)]
    rel_err = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(want, got)
    )
    dense = [g for g, p in zip(got, params) if getattr(p, "allreduce", True)]
    dense_sum = float(sum(g.double().abs().sum() for g in dense))  # every rank must hold the same
    expert = [i for i, p in enumerate(params) if getattr(p, "allreduce", True) is False]
    # the expert grads really were summed over the replicas when there are any
    edp = world // ep
    e0 = expert[1]  # expert[0] is none_at
    summed = sum(_rank_grads(engine, r)[e0] for r in range(rank % ep, world, ep)) / world
    bf16 = can_sum_gradients(_engine(ep, {"bf16": {"enabled": True}})) if world == 2 else None
    write_result(
        out_dir,
        rank,
        {
            "mismatched": mismatched,
            "rel_err": rel_err,
            "dense_sum": dense_sum,
            "dense_bits": [
                torch.cat([g.flatten() for g in dense]).view(torch.int32)[::97].tolist()
            ],
            "n": len(params),
            "n_expert": len(expert),
            "none_zero": bool(torch.count_nonzero(got[none_at]) == 0) if edp == 1 else None,
            "expert_sum_err": float((got[e0] - summed).abs().max()),
            "can_sum_bf16": bf16,
        },
    )


@pytest.mark.parametrize("shm", [False, True], ids=["gloo", "shm"])
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_grad_sum_matches_deepspeed_bitwise(tmp_path, world, ep, shm):
    if shm and not shm_has_room(world):
        pytest.skip(f"/dev/shm has no room for {world} DeepSpeed workspaces")
    env = {"LOCAL_SIZE": str(world)} if shm else {}
    run_distributed(
        _worker, world, ep, str(tmp_path), shm, init="deepspeed", retry_on_signal=True, env=env
    )
    results = read_results(tmp_path, world)
    for r, res in enumerate(results):
        assert res["n_expert"] > 0 and res["n"] > res["n_expert"]
        # every rank holds the same dense gradients, bit for bit
        assert res["dense_bits"] == results[0]["dense_bits"], r
        if shm and world > 2:
            # shared memory sums the ranks in rank order, gloo's ring in another: rounding only
            assert res["rel_err"] < 1e-6, (r, res["rel_err"])
        else:
            assert res["mismatched"] == [], (r, res)
        if res["none_zero"] is not None:  # an expert with no gradient gets zeros, as DeepSpeed
            assert res["none_zero"], r
        assert res["expert_sum_err"] < 1e-4, (r, res)
        assert res["can_sum_bf16"] in (False, None)  # bf16 keeps DeepSpeed's own path
