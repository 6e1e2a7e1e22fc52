"""Expert parallelism over DeepSpeed's process groups."""

from sigma_moe.parallel.expert_parallel import DispatchContext, ExpertParallel

__all__ = ["DispatchContext", "ExpertParallel"]
