"""ep_rank_for against DeepSpeed's real group layout, moe_param_groups, wire_expert_parallel."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import read_results, run_distributed, write_result

from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM
from sigma_moe.parallel import ep_rank_for, moe_param_groups, wire_expert_parallel


@pytest.mark.parametrize(
    "world,ep,expect",
    [
        (1, 1, [0]),
        (2, 2, [0, 1]),
        (4, 2, [0, 1, 0, 1]),
        (8, 4, [0, 1, 2, 3, 0, 1, 2, 3]),
    ],
)
def test_ep_rank_for_default_layout(world, ep, expect):
    assert [ep_rank_for(ep, rank=r, world_size=world) for r in range(world)] == expect


def test_ep_rank_for_data_before_expert_layout():
    # D + E: EP groups are strided by world/ep: [0, 2], [1, 3] for world 4, ep 2.
    got = [ep_rank_for(2, r, 4, use_data_before_expert_parallel=True) for r in range(4)]
    assert got == [0, 0, 1, 1]


def test_ep_rank_for_rejects_indivisible():
    with pytest.raises(ValueError, match="ep_size"):
        ep_rank_for(3, rank=0, world_size=4)


def test_moe_param_groups_split():
    model = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny", ep_size=2), ep_rank=1)
    groups = moe_param_groups(model, weight_decay=0.1)
    assert all("name" in g for g in groups)
    by_id = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(by_id) == len(params)  # every parameter exactly once
    for name, p in params.items():
        g = by_id[id(p)]
        if "experts" in name:
            assert g.get("moe") is True and g["name"] == "ep_size_2", name
            assert g["weight_decay"] == 0.1
        else:
            assert not g.get("moe", False), name
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
    assert any(g.get("moe") for g in groups)


def _wire_worker(rank: int, world: int, ep: int, out_dir: str) -> None:
    from deepspeed.utils import groups

    cfg = SigmaMoEConfig.preset("test-tiny", ep_size=ep, kernel_backend="torch")
    model = SigmaMoEForCausalLM(cfg, ep_rank=ep_rank_for(ep))
    info = wire_expert_parallel(model, ep)
    layers = [b.moe for b in model.layers]
    ep_group_ranks = list(groups._get_expert_parallel_group_ranks(f"ep_size_{ep}"))
    res = {
        **info,
        "ep_group": ep_group_ranks,
        "ep_set": all(layer.ep is not None for layer in layers),
        "dp_world": all(dist.get_world_size(layer.dp_group) == world for layer in layers),
        "first": layers[0].ep.first_expert,
    }
    write_result(out_dir, rank, res)


@pytest.mark.distributed
def test_wire_expert_parallel_four_processes(tmp_path):
    run_distributed(_wire_worker, 4, 2, str(tmp_path), init="deepspeed", retry_on_signal=True)
    res = read_results(tmp_path, 4)
    for r, x in enumerate(res):
        assert x["ep_size"] == 2 and x["ep_rank"] == r % 2 and x["dp_size"] == 4
        assert x["ep_group"] == [r - r % 2, r - r % 2 + 1]
        assert x["ep_set"] and x["dp_world"] and x["first"] == (r % 2) * 4


def test_wire_expert_parallel_single_process_ep1():
    model = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny"))
    info = wire_expert_parallel(model)
    assert info["ep_size"] == 1 and all(b.moe.ep is None for b in model.layers)


def test_wire_expert_parallel_rejects_mismatch():
    model = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny", ep_size=2))
    with pytest.raises(ValueError, match="ep_size"):
        wire_expert_parallel(model, 4)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed"):
            wire_expert_parallel(model, 2)


def test_torch_compiled_model_is_unwrapped():
    model = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny"))

    class Wrapper(torch.nn.Module):  # what DeepSpeed's engine / torch.compile put around it
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert wire_expert_parallel(Wrapper(model))["num_moe_layers"] == 2
