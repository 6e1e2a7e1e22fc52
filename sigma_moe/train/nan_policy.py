"""`train.nan_policy`: what a non-finite loss does (skip the update or stop with a checkpoint of
the last good weights). The loop itself never backpropagates a NaN/Inf (it zeroes the step);
this callback counts those steps and decides whether the run goes on."""

from __future__ import annotations

from sigma_moe import errors
from sigma_moe.train.checkpoint import Checkpointer, NonFiniteWeights
from sigma_moe.train.hooks import Callback
from sigma_moe.train.log import log


class NanGuard(Callback):
    """`train.nan_policy`: skip (up to `nan_max_skips` non-finite steps, weights untouched) or
    stop; stopping saves a checkpoint of the last good weights first (its step counter is past
    the bad batch, so a resume does not replay it)."""

    def __init__(self, cfg, checkpointer: Checkpointer):
        """`cfg`: the `train` section (nan_policy, nan_max_skips)."""
        self.cfg, self.ckpt = cfg, checkpointer

    def on_step_end(self, trainer, m):
        if not m["nonfinite"]:
            return
        trainer.state.nan_skips += 1
        tr = self.cfg
        if tr.nan_policy == "stop" or trainer.state.nan_skips > tr.nan_max_skips:
            why = (
                f"non-finite loss at step {m['step']} ({trainer.state.nan_skips} so far, "
                f"train.nan_policy={tr.nan_policy}, train.nan_max_skips={tr.nan_max_skips})"
            )
            try:
                path = self.ckpt.save(trainer)  # refuses weights that are not finite
            except NonFiniteWeights as e:
                raise errors.NonFiniteLoss(f"{why}; {e}") from e
            raise errors.NonFiniteLoss(
                f"{why}; the last good weights (all finite) are saved in {path} "
                "(resume with --resume auto)"
            )
        if trainer.world.is_main:
            log(
                f"[nan] step {m['step']}: non-finite loss, update skipped "
                f"({trainer.state.nan_skips}/{tr.nan_max_skips})"
            )
