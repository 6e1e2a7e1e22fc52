"""Wire a SigmaMoEForCausalLM to DeepSpeed's process groups.

The order a trainer follows (see launch/README.md, "What the trainer calls"):

    ep_rank = ep_rank_for(cfg.parallel.ep_size)               # before the model exists
    model = SigmaMoEForCausalLM(model_cfg, ep_rank=ep_rank)  # builds only this rank's experts
    groups = moe_param_groups(model, weight_decay)           # optimizer param groups
    engine, optim, _, _ = deepspeed.initialize(model=model, model_parameters=groups, ...)
    wire_expert_parallel(engine, cfg.parallel.ep_size)       # EP all-to-all + balance-loss group

DeepSpeed's default layout (`groups._create_expert_and_data_parallel`, no tensor/pipeline
parallelism): the expert-parallel groups are consecutive blocks of ep_size ranks
([0, 1], [2, 3], … for ep_size 2) and the expert-data-parallel groups are strided
([0, 2, 4, …], [1, 3, 5, …]); the dense data-parallel group is the whole world.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn

from sigma_moe.parallel.expert_parallel import ExpertParallel


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ep_rank_for(
    ep_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    use_data_before_expert_parallel: bool = False,
) -> int:
    """This process's rank inside its DeepSpeed expert-parallel group of size `ep_size`, i.e.
    which slice of experts it holds. Usable before `deepspeed.initialize` (it reads the global
    rank from torch.distributed, or from RANK / WORLD_SIZE when no group exists yet).

    Mirrors `deepspeed.utils.groups._create_expert_and_data_parallel` (no TP/PP): E + D layout
    (default) puts ranks [i·P, (i+1)·P) in one EP group, so the EP rank is `rank % P`; the
    D + E layout (`use_data_before_expert_parallel_`) strides EP groups by world/P, so it is
    `rank // (world/P)`.
    """
    g_rank, g_world = _world()
    rank = g_rank if rank is None else rank
    world_size = g_world if world_size is None else world_size
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"parallel.ep_size: {ep_size} does not divide the world size {world_size}")
    if use_data_before_expert_parallel:
        return rank // (world_size // ep_size)
    return rank % ep_size


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DeepSpeed engine and/or torch.compile (or the model itself)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)  # DeepSpeedEngine, DDP
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def moe_layers(model: nn.Module) -> list[nn.Module]:
    from sigma_moe.model.moe import SigmaMoELayer

    return [m for m in _unwrap(model).modules() if isinstance(m, SigmaMoELayer)]


def _expert_parallel_group(ep_size: int):
    """DeepSpeed's `ep_size_{P}` expert-parallel group of this rank (created if missing, with
    DeepSpeed's own function, e.g. when no engine has been initialised)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def _data_parallel_group():
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


def wire_expert_parallel(model: nn.Module, ep_size: int | None = None) -> dict:
    """Give every SigmaMoELayer of `model` (a DeepSpeed engine or the bare model) its
    expert-parallel exchange and the balance-loss group. Call after `deepspeed.initialize`.

    - ep_size > 1: `layer.ep = ExpertParallel(<DeepSpeed's ep_size_{P} group>, num_experts)`;
      checks that this rank's EP rank is the one `ep_rank_for` gave the model's constructor
      and that the layer holds E/P experts.
    - `model.set_dp_group(<DeepSpeed's data-parallel group>)` when torch.distributed runs with
      more than one process: the global-batch balance loss sums expert counts over every rank
      that sees different tokens, which is the whole data-parallel world (EP ranks see
      different tokens too), not the expert-data-parallel group.

    Returns a small summary (ep_size, ep_rank, dp_size, num_moe_layers) for the log.
    """
    layers = moe_layers(model)
    inner = _unwrap(model)
    if not layers:
        raise ValueError("wire_expert_parallel: the model has no SigmaMoELayer")
    sizes = {layer.ep_size for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"wire_expert_parallel: layers disagree on ep_size: {sorted(sizes)}")
    built = sizes.pop()
    if ep_size is None:
        ep_size = built
    if ep_size != built:
        raise ValueError(
            f"parallel.ep_size is {ep_size} but the model was built with ep_size {built}"
        )
    distributed = dist.is_available() and dist.is_initialized()
    if ep_size > 1 and not distributed:
        raise RuntimeError(
            f"parallel.ep_size={ep_size} needs torch.distributed (launch with "
            "launch/pretrain.sh --nproc N or the deepspeed launcher)"
        )
    ep_rank = 0
    if ep_size > 1:
        group = _expert_parallel_group(ep_size)
        ep_rank = dist.get_rank(group=group)
        if ep_rank != ep_rank_for(ep_size):
            raise RuntimeError(
                f"rank {dist.get_rank()}: DeepSpeed's expert-parallel rank is {ep_rank} but "
                f"ep_rank_for({ep_size}) = {ep_rank_for(ep_size)} built the model's experts"
            )
        for layer in layers:
            ep = ExpertParallel(group, layer.n_routed)
            n_local = layer.experts.w_gate_EDF.shape[0]
            if n_local != ep.num_local_experts:
                raise RuntimeError(
                    f"MoE layer {layer.layer_idx} holds {n_local} experts, expected "
                    f"{ep.num_local_experts} (= {layer.n_routed} / ep_size {ep_size})"
                )
            layer.ep = ep
    else:
        for layer in layers:
            layer.ep = None
    dp_size = 1
    if distributed and dist.get_world_size() > 1:
        dp_group = _data_parallel_group()
        dp_size = dist.get_world_size(group=dp_group)
        inner.set_dp_group(dp_group)
    else:
        inner.set_dp_group(None)
    return {
        "ep_size": ep_size,
        "ep_rank": ep_rank,
        "dp_size": dp_size,
        "num_moe_layers": len(layers),
    }


def moe_param_groups(
    model: nn.Module, weight_decay: float, max_group_size: int | None = 178956971
) -> list[dict]:
    """Optimizer param groups for DeepSpeed with MoE: decay on matrices (dim ≥ 2: embeddings,
    projections, router, experts), none on norms and biases; expert params (tagged
    `allreduce=False`, `group_name="ep_size_{P}"`) split into their own MoE groups (`moe: True`,
    `name: "ep_size_{P}"`) by `deepspeed.moe.utils.split_params_into_different_moe_groups_for_
    optimizer`, as ZeRO-1/2 need. Pass the result as `model_parameters=` to
    `deepspeed.initialize` (or to a torch optimizer given to it). Groups left empty are dropped.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = split_params_into_different_moe_groups_for_optimizer(
        groups, max_group_size=max_group_size
    )
    return [g for g in groups if len(g["params"]) > 0]
