"""Expert parallelism over DeepSpeed's process groups (see launch/README.md for the call order)."""

from sigma_moe.parallel.expert_parallel import DispatchContext, ExpertParallel
from sigma_moe.parallel.wiring import (
    ep_rank_for,
    moe_layers,
    moe_param_groups,
    wire_expert_parallel,
)

__all__ = [
    "DispatchContext",
    "ExpertParallel",
    "ep_rank_for",
    "moe_layers",
    "moe_param_groups",
    "wire_expert_parallel",
]
