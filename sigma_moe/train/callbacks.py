"""Callbacks around the thin loop: metrics.jsonl, progress bar, wandb, eval, checkpoints, NaN
policy, end-of-run summary and plots. Each is a `sigma_moe.train.hooks.Callback` (its hooks and
their order are documented there). Each takes the values it needs, not the run config:
`default_callbacks` is their builder, the one place that reads the run config's sections."""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sigma_moe.config import save_config
from sigma_moe.errors import StageInterrupted
from sigma_moe.train.checkpoint import Checkpointer, RunFacts
from sigma_moe.train.domain_stats import ExpertLoadByDomain
from sigma_moe.train.hooks import Callback
from sigma_moe.train.nan_policy import NanGuard

__all__ = ["StageInterrupted", "default_callbacks", "format_summary", "require_complete"]


def _log(trainer, metrics: dict[str, Any]) -> None:
    trainer.log(metrics)


def _is_boundary(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class MetricsWriter(Callback):
    """metrics.jsonl on rank 0: a line every `train.log_every` steps (and the last), plus eval
    lines."""

    def __init__(self, path: Path, log_every: int, max_steps: int):
        self.path, self.log_every, self.max_steps = path, log_every, max_steps

    def on_step_end(self, trainer, m):
        if _is_boundary(m["step"], self.log_every, self.max_steps):
            _log(trainer, m)

    def on_log(self, trainer, m):
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")


class ProgressBar(Callback):
    def __init__(self, max_steps: int):
        self.bar, self.max_steps = None, max_steps

    def on_train_start(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.max_steps,
            initial=trainer.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_step_end(self, trainer, m):
        post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
        if m.get("scorer_wait_s"):
            post["scorer_wait"] = f"{m['scorer_wait_s']:.1f}s"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_log(self, trainer, m):
        if "val_loss" in m:
            from tqdm.auto import tqdm

            tqdm.write(f"step {m['step']}: val_loss {m['val_loss']:.4f}", file=sys.stderr)

    def on_train_end(self, trainer, last):
        if self.bar is not None:
            self.bar.close()


class WandbLogger(Callback):
    """`cfg`: the `logging` section; `run_config`: the whole run config as a dict (what wandb
    records as the run's config)."""

    def __init__(self, cfg, out_dir: Path, run_config: dict[str, Any]):
        self.cfg, self.out_dir, self.run_config, self.run = cfg, out_dir, run_config, None

    def on_train_start(self, trainer):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.cfg.wandb_project,
            mode=self.cfg.wandb_mode,
            dir=str(self.out_dir),
            config=self.run_config,
            name=self.out_dir.name,
            resume="allow",
            reinit="finish_previous",
        )

    def on_log(self, trainer, m):
        if self.run is not None:
            self.run.log(
                {k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"]
            )

    def on_train_end(self, trainer, last):
        if self.run is not None:
            self.run.finish()


class Evaluator(Callback):
    """Per-domain validation loss every `train.eval_every` steps and at the end (all ranks).
    Resumable state: the evaluations so far (the summary compares the first with the last)."""

    def __init__(self, eval_every: int, max_steps: int):
        self.eval_every, self.max_steps = eval_every, max_steps
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state["history"]]

    def _eval(self, trainer):
        res = {"step": trainer.state.step, **trainer.evaluate()}
        self.history.append(res)
        if trainer.world.is_main:
            _log(trainer, res)

    def on_train_start(self, trainer):
        if not self.history:  # nothing restored: a fresh run
            self._eval(trainer)  # the starting point the demo's "fell by X%" is measured from

    def on_step_end(self, trainer, m):
        if _is_boundary(m["step"], self.eval_every, self.max_steps):
            self._eval(trainer)


class Summary(Callback):
    """End-of-run table (rank 0) and plots; the dict (`summary`) goes to summary.json and is
    what run_training returns. `evaluator`: whose history gives the first and last eval."""

    def __init__(self, out_dir: Path, evaluator: Evaluator, max_steps: int):
        self.out_dir, self.evaluator, self.max_steps = out_dir, evaluator, max_steps
        self.tps: list[float] = []
        self.loads: list[float] = []
        self.summary: dict[str, Any] = {}

    def on_step_end(self, trainer, m):
        self.tps.append(m["tokens_per_s"])
        self.loads.append(
            statistics.mean(v for k, v in m.items() if k.startswith("expert_load_max/"))
        )

    def on_train_end(self, trainer, last):
        hist = self.evaluator.history
        step, max_steps = trainer.state.step, self.max_steps
        crashed = sys.exc_info()[0] is not None
        stopped = trainer.stop_requested or (type(sys.exc_info()[1]).__name__ if crashed else None)
        summary: dict[str, Any] = {
            "steps": step,
            "max_steps": max_steps,
            # An interrupted run's numbers are not a result (issue 15): callers check this.
            "complete": step >= max_steps and not crashed,
            "stopped_by": None if step >= max_steps and not crashed else stopped,
            "tokens": trainer.state.tokens,
            "final_loss": last.get("loss"),
            "tokens_per_s_median": statistics.median(self.tps) if self.tps else None,
            "expert_load_max_final": self.loads[-1] if self.loads else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads(),
            "omp_wait": omp_wait_setting(),
        }
        if hist:
            summary["first_eval"], summary["last_eval"] = hist[0], hist[-1]
            summary["final_eval"] = hist[-1].get("step") == step
        self.summary = summary
        if not trainer.world.is_main:
            return
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary), file=sys.stderr)
        try:
            from sigma_moe.train.plots import plot_run

            plot_run(self.out_dir)
        except Exception as e:  # a missing plot must never fail a finished run
            print(f"[plots] skipped: {e}", file=sys.stderr)


def omp_wait_setting() -> str:
    """How this process's OpenMP threads wait (sigma_moe/_threads.py's choice, or the user's)."""
    mode = os.environ.get("SIGMA_MOE_OMP_WAIT")
    if mode == "spin":
        return "spin (libgomp default: the cores were free at start)"
    pol, n = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if mode == "short":
        return f"short (OMP_WAIT_POLICY={pol} GOMP_SPINCOUNT={n}: the cores were busy at start)"
    return f"as set: OMP_WAIT_POLICY={pol} GOMP_SPINCOUNT={n}"


def _stop_line(s: dict[str, Any]) -> str | None:
    if s.get("complete", True):
        return None
    return (
        f"stopped ({s.get('stopped_by') or 'interrupted'}) at step {s['steps']} of "
        f"{s.get('max_steps', '?')}: continue with --resume auto"
    )


def format_summary(s: dict[str, Any]) -> str:
    lines = ["", f"== run summary: {s['steps']} steps, {s['tokens']:,} tokens =="]
    stop = _stop_line(s)
    if stop:
        lines.append(stop)
    first, last = s.get("first_eval"), s.get("last_eval")
    if first and last and not s.get("final_eval", True):
        # A stopped run: the last evaluation is from an earlier step, never call it the end.
        lines.append(
            f"no final evaluation ran: the last one was at step {last.get('step')} "
            f"(val_loss {last['val_loss']:.4f}); evaluate the checkpoint with `sigma-moe eval`"
        )
    elif first and last:
        lines.append(f"{'validation loss':<22}{'start':>10}{'end':>10}")
        for k in sorted(k for k in last if k.startswith("val_loss/")):
            lines.append(
                f"  {k.split('/', 1)[1]:<20}{first.get(k, float('nan')):>10.4f}{last[k]:>10.4f}"
            )
        for k in ("clean_val_loss", "val_loss"):
            if k in last:
                lines.append(f"  {k:<20}{first.get(k, float('nan')):>10.4f}{last[k]:>10.4f}")
        drop = 100 * (1 - last["val_loss"] / first["val_loss"])
        lines.append(
            f"  average validation loss fell {drop:.1f}% ({first['val_loss']:.4f} -> {last['val_loss']:.4f})"
        )
    if s.get("tokens_per_s_median"):
        lines.append(f"tokens/s (median)       {s['tokens_per_s_median']:.0f}")
    if s.get("expert_load_max_final") is not None:
        lines.append(
            f"expert load max/mean    {s['expert_load_max_final']:.2f} (1.00 = perfectly balanced)"
        )
    lines.append(f"peak memory (RSS)       {s['peak_rss_gib']:.2f} GiB")
    if s.get("omp_wait"):
        lines.append(f"threads / OpenMP wait   {s['threads']} / {s['omp_wait']}")
    return "\n".join(lines)


def require_complete(summary: dict[str, Any], stage: str, run_dir: Path, resume_hint: str) -> None:
    """Raise StageInterrupted unless `summary` (run_training's) is of a finished run."""
    if summary.get("complete", False):
        return
    raise StageInterrupted(
        f"stage '{stage}' stopped ({summary.get('stopped_by') or 'interrupted'}) at step "
        f"{summary.get('steps')} of {summary.get('max_steps')} with a checkpoint in "
        f"{run_dir / 'checkpoints'}; the later stages did not run and no result was written "
        f"(its numbers are incomplete); continue with: {resume_hint}"
    )


def checkpoint_facts(cfg) -> RunFacts:
    """What the checkpointer needs of the run config's other sections."""
    return RunFacts(
        ep_size=cfg.parallel.ep_size,
        zero_stage=cfg.parallel.zero_stage,
        global_batch_size=cfg.train.global_batch_size,
        router_bias_start_zero=cfg.model.router_bias_start_zero,
        data_identity={
            "train.max_steps": cfg.train.max_steps,
            "train.seed": cfg.train.seed,
            "data.seq_len": cfg.data.seq_len,
            "data.domains": [asdict(d) for d in cfg.data.domains],
        },
        save_config=functools.partial(save_config, cfg),
    )


def default_callbacks(
    cfg, out_dir: Path, world, resume: str, policy: list[Callback] | None = None
) -> list[Callback]:
    """The run's callbacks in hook order, built from the run config `cfg` (each gets its own
    section or the values it needs); `policy`: the callbacks of a data-centric policy (the
    Rho-1 objective) go right after the checkpointer, so they start after a resume restored the
    step, and they end before the summary (whose plots read the Rho-1 selection counts)."""
    tr = cfg.train
    ck = Checkpointer(cfg.checkpoint, out_dir, world, resume, checkpoint_facts(cfg))
    # Order matters on step end: evaluate first, so a checkpoint carries that step's eval (and
    # the domain × expert counts up to that step).
    ev = Evaluator(tr.eval_every, tr.max_steps)
    load = ExpertLoadByDomain(out_dir, tr.eval_every, tr.max_steps)
    cbs: list[Callback] = [ev, load, NanGuard(tr, ck), ck]
    cbs += policy or []
    if world.is_main:
        cbs.append(MetricsWriter(out_dir / "metrics.jsonl", tr.log_every, tr.max_steps))
        if cfg.logging.progress:
            cbs.append(ProgressBar(tr.max_steps))
        if cfg.logging.wandb_mode != "disabled":
            cbs.append(WandbLogger(cfg.logging, out_dir, cfg.to_dict()))
    cbs.append(Summary(out_dir, ev, tr.max_steps))
    return cbs
