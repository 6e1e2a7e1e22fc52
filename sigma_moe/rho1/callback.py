"""The trainer's Rho-1 objective: one object that owns the scorer and the selection.

``Rho1Callback(cfg.rho1, out_dir, world, run_config=cfg)`` is the training ``Objective`` of a
run with ``rho1.mode != "none"`` (the run assembly, ``sigma_moe.run``, passes it to
``sigma_moe.train.loop.run_training``), and a ``Callback`` for the scorer's lifetime. On
``on_train_start`` it starts a ``ScorerSupervisor`` (the side process on local rank 0 of each
node, followers on the node's other ranks; or inline / prefilled). Then, each step:

- ``on_batches``: puts ``ref_loss`` (float32) into every micro-batch: waits (bounded) for the
  batch's rows; every rank agrees on success, so a scorer failure raises ``ScorerError`` on all
  ranks at the same call (no rank is left blocked in a collective), before any forward;
- ``weight_sum(n_valid[dp, accum]) -> float``: Σ token weights of the global batch from the
  valid-token counts alone (the loss denominator, before any forward);
- ``token_weights(ce_BS, batch, valid_BS) -> (weights_BS, metrics)``: the selection for one
  micro-batch (threshold over the micro-batch, or over the data-parallel group in the same
  micro-step with ``rho1.threshold_scope=global``) and the step's selection metrics so far
  (``selected_frac``, ``selected_frac/<domain>``, ``excess_loss_selected``,
  ``excess_loss_rejected``, ``scorer_wait_s``; this rank's micro-batches).

It has no resumable state (``Stateful``'s default): the scorer's position in the store follows
``trainer.state.consumed_samples`` (``advance``), and the reference losses are a pure function
of the sample. Its status (wait times, restarts) is telemetry, written to
``rho1_selection.json`` at the end (it used to be copied into the checkpoint too, and never read).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sigma_moe.config import Rho1Config, RunConfig
from sigma_moe.rho1.scorer import ScorerError, ScorerSupervisor, resolve_mode
from sigma_moe.rho1.selection import (
    EXCESS_HIST_EDGES,
    excess_histogram,
    merge_stats,
    metrics_from_stats,
    selection_stats,
    token_weights,
    weight_sum,
)
from sigma_moe.train.collectives import agree_all
from sigma_moe.train.hooks import Callback, Objective


def default_store_path(rho1: Rho1Config, out_dir: str | os.PathLike) -> Path:
    return Path(rho1.store) if rho1.store else Path(out_dir) / "ref_store"


def _node_ranks(world) -> list[int] | None:
    lws = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if lws is None:
        return None if world.rank == world.local_rank else [world.rank]
    first = world.rank - world.local_rank
    return list(range(first, first + int(lws)))


class Rho1Callback(Callback, Objective):
    """Reads only its own section, ``rho1``; ``run_config`` (the whole run) is handed, unread,
    to the scorer supervisor, whose side process rebuilds the training data and the reference
    model from it."""

    def __init__(
        self,
        rho1: Rho1Config,
        out_dir: str | os.PathLike,
        world=None,
        *,
        run_config: RunConfig,
        num_threads: int | None = None,
    ):
        # rho1.scorer as it runs on this node (``auto`` resolved once, here)
        rho1 = dataclasses.replace(rho1, scorer=resolve_mode(rho1.scorer))
        self.r, self.out_dir, self.world = rho1, Path(out_dir), world
        self.run_config = run_config
        self.num_threads = num_threads or int(os.environ.get("SIGMA_MOE_SCORER_THREADS", "1"))
        self.sup: ScorerSupervisor | None = None
        self._stats: dict[str, float] = {}
        self._stats_step = -1
        self._wait_step = 0.0
        self._group = None
        self._domain_names: list[str] = []
        self.run_stats: dict[str, float] = {}  # whole-run sums (this rank)

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer) -> None:
        if self.r.mode == "none":
            return
        if self.world is None:
            self.world = trainer.world
        dp = trainer.dp
        if self.r.threshold_scope == "global" and dp > 1:
            self._group = dist.group.WORLD
        spawn = self.world.local_rank == 0
        self.sup = ScorerSupervisor(
            self.run_config,
            default_store_path(self.r, self.out_dir),
            dataset=trainer.train_ds,
            dp=dp,
            ranks=_node_ranks(self.world) if dp > 1 else None,
            num_threads=self.num_threads,
            mode=self.r.scorer,  # resolved in __init__
            spawn=spawn,
            # inline: the trainer's own device; side process: the node's first GPU (or CPU)
            device=str(self.world.device) if self.r.scorer == "inline" else None,
        )
        self._domain_names = list(trainer.train_ds.domain_names)
        self.sup.advance(trainer.state.consumed_samples)
        self._agree(self.sup.start)

    def on_batches(self, trainer, batches) -> None:
        if self.sup is None:
            return
        for b in batches:
            b["ref_loss"] = self._ref_losses(trainer, b).to(trainer.world.device)

    def on_step_end(self, trainer, m) -> None:
        if self.sup is not None:
            # Let the scorer move on while the trainer logs / evaluates / checkpoints.
            self.sup.advance(trainer.state.consumed_samples)

    def on_train_end(self, trainer, last) -> None:
        if self.sup is None:
            return
        status = self.sup.status()  # written to rho1_selection.json below
        self.sup.close()
        self.sup = None
        if self.run_stats:
            totals = metrics_from_stats(self.run_stats, self._domain_names)
            doc = {
                "rank": self.world.rank,
                "note": "this rank's micro-batches since the run (re)started",
                "metrics": {k: (None if v != v else v) for k, v in totals.items()},
                "counts": self.run_stats,
                "domain_names": self._domain_names,
                "excess_hist_edges": EXCESS_HIST_EDGES,
                "scorer": {"mode": self.r.scorer, **status},
            }
            name = (
                "rho1_selection.json"
                if self.world.rank == 0
                else f"rho1_selection.rank{self.world.rank}.json"
            )
            (self.out_dir / name).write_text(json.dumps(doc, indent=1))

    # ------------------------------------------------------------------ functions

    def _agree(self, fn, *args):
        """Run fn on every rank; if it fails anywhere, raise ScorerError everywhere."""
        err: BaseException | None = None
        out = None
        try:
            out = fn(*args)
        except ScorerError as e:
            err = e
        if not agree_all(err is None, device=self.world.device) and err is None:
            err = ScorerError("the Rho-1 scorer failed on another rank (see its log)")
        if err is not None:
            raise err
        return out

    def _ref_losses(self, trainer, b) -> torch.Tensor:
        step = trainer.state.step
        if step != self._stats_step:
            self._stats, self._stats_step, self._wait_step = {}, step, 0.0
        keys = list(zip(b["domain"].tolist(), b["sample_index"].tolist()))
        rows = self._agree(self.sup.wait_for, keys, None, trainer.state.consumed_samples)
        self._wait_step += self.sup.last_wait_s
        return rows

    def weight_sum(self, n_all) -> float:
        """n_all: [dp, accum] valid-token counts of the global batch."""
        if self.r.mode == "none":
            return super().weight_sum(n_all)
        n = torch.as_tensor(n_all, dtype=torch.float64).reshape(-1, n_all.shape[-1])
        kw = dict(
            mode=self.r.mode, ratio=self.r.select_ratio, unselected_weight=self.r.unselected_weight
        )
        if self._group is not None:
            return float(sum(weight_sum(int(c), **kw) for c in n.sum(dim=0).tolist()))
        return float(sum(weight_sum(int(c), **kw) for c in n.reshape(-1).tolist()))

    def token_weights(self, ce_BS, b, valid_BS) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.r.mode == "none":
            return super().token_weights(ce_BS, b, valid_BS)
        ref_BS = b["ref_loss"].to(ce_BS.device, torch.float32)
        w, sel = token_weights(
            ce_BS,
            ref_BS,
            valid_BS,
            mode=self.r.mode,
            ratio=self.r.select_ratio,
            unselected_weight=self.r.unselected_weight,
            group=self._group,
            return_selected=True,
        )
        excess = ce_BS.detach().float() - ref_BS
        st = selection_stats(sel.cpu(), valid_BS.cpu(), excess.cpu(), b["domain"].cpu())
        self._stats = merge_stats(self._stats, st)
        # The whole-run sums also keep the excess-loss histogram (the report plots it).
        hist = excess_histogram(sel.cpu(), valid_BS.cpu(), excess.cpu())
        self.run_stats = merge_stats(self.run_stats, st, hist)
        m = {
            k: v
            for k, v in metrics_from_stats(self._stats, self._domain_names).items()
            if v == v  # drop NaN (e.g. no rejected token at select_ratio=1)
        }
        m["scorer_wait_s"] = self._wait_step
        m["scorer_restarts"] = self.sup.restarts if self.sup is not None else 0
        return w.to(ce_BS.dtype), m
