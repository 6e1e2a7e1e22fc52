"""Callbacks around the thin loop: metrics.jsonl, progress bar, wandb, eval, checkpoints, NaN
policy, end-of-run summary and plots. Each implements any of `on_train_start(trainer)`,
`on_step_end(trainer, metrics)`, `on_log(trainer, metrics)`, `on_train_end(trainer, last)`, and
`on_resume(trainer)` (called before every `on_train_start`)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sigma_moe.train import checkpoint as ckpt_io


def _log(trainer, metrics: dict[str, Any]) -> None:
    trainer._call("on_log", metrics)


def _is_boundary(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class MetricsWriter:
    """metrics.jsonl on rank 0: a line every `train.log_every` steps, plus eval lines."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, trainer, m):
        if _is_boundary(m["step"], trainer.cfg.train.log_every, trainer.cfg.train.max_steps):
            _log(trainer, m)

    def on_log(self, trainer, m):
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")


class ProgressBar:
    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.cfg.train.max_steps,
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
            self.bar.write(f"step {m['step']}: val_loss {m['val_loss']:.4f}")

    def on_train_end(self, trainer, last):
        if self.bar is not None:
            self.bar.close()


class WandbLogger:
    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir, self.run = cfg, out_dir, None

    def on_train_start(self, trainer):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.cfg.logging.wandb_project,
            mode=self.cfg.logging.wandb_mode,
            dir=str(self.out_dir),
            config=self.cfg.to_dict(),
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


class Evaluator:
    """Per-domain validation loss every `train.eval_every` steps and at the end (all ranks)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def _eval(self, trainer):
        res = {"step": trainer.state.step, **trainer.evaluate()}
        self.history.append(res)
        trainer.state.extra["eval_history"] = self.history
        if trainer.world.is_main:
            _log(trainer, res)

    def on_train_start(self, trainer):
        self.history = list(trainer.state.extra.get("eval_history", []))
        if not self.history:
            self._eval(trainer)  # the starting point the demo's "fell by X%" is measured from

    def on_step_end(self, trainer, m):
        if _is_boundary(m["step"], trainer.cfg.train.eval_every, trainer.cfg.train.max_steps):
            self._eval(trainer)


class Checkpointer:
    """Save every `checkpoint.every` steps, at the end and on SIGTERM/SIGINT; resume at start.

    A checkpoint counts as complete only once its meta.json exists and `latest` names it; both
    are written last, by rank 0, after a barrier, so a run killed mid-save leaves the previous
    checkpoint as the newest complete one."""

    def __init__(self, cfg, out_dir: Path, world, resume: str):
        self.cfg, self.root, self.world, self.resume = cfg, out_dir / "checkpoints", world, resume
        self.last_saved = -1

    def on_resume(self, trainer):
        if self.resume in (None, "none"):
            return
        try:
            ckpt = ckpt_io.resolve_checkpoint(self.root if self.resume == "auto" else self.resume)
        except FileNotFoundError:
            if self.resume == "auto":
                if self.world.is_main:
                    print(
                        f"[resume] no complete checkpoint under {self.root}; starting fresh",
                        file=sys.stderr,
                    )
                return
            raise
        self.load(trainer, ckpt)

    def load(self, trainer, ckpt: Path) -> None:
        meta = ckpt_io.read_meta(ckpt)
        fp = trainer.tokenizer.fingerprint
        if meta.get("tokenizer_fingerprint") not in (None, fp):
            raise ValueError(
                f"checkpoint {ckpt} was trained with tokenizer {meta['tokenizer_fingerprint']}, "
                f"the config's data.tokenizer is {fp}"
            )
        old_gbs = meta.get("global_batch_size")
        if old_gbs is not None and old_gbs != self.cfg.train.global_batch_size:
            raise ValueError(
                f"config key 'train.global_batch_size': the checkpoint {ckpt} was trained with "
                f"{old_gbs}, the config says {self.cfg.train.global_batch_size}; resuming would "
                "re-map the data order, so it is refused (start a new run from its weights instead)"
            )
        _, client = trainer.engine.load_checkpoint(
            str(ckpt.parent),
            tag=ckpt.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if client is None:
            raise ValueError(f"checkpoint {ckpt} could not be loaded by DeepSpeed")
        st = client["train_state"]
        trainer.state.step, trainer.state.consumed_samples = st["step"], st["consumed_samples"]
        trainer.state.tokens, trainer.state.nan_skips = st["tokens"], st["nan_skips"]
        trainer.state.extra.update(st.get("extra", {}))
        rng = ckpt / f"rng_rank{self.world.rank}.pt"
        if rng.is_file():
            ckpt_io.set_rng_state(torch.load(rng, weights_only=False))
        self.last_saved = trainer.state.step
        if self.world.is_main:
            print(f"[resume] from {ckpt} (step {trainer.state.step})", file=sys.stderr)

    def save(self, trainer) -> Path:
        step = trainer.state.step
        tag = ckpt_io.tag_for(step)
        client = {"train_state": asdict(trainer.state)}
        trainer.engine.save_checkpoint(
            str(self.root), tag=tag, client_state=client, save_latest=False
        )
        path = self.root / tag
        torch.save(ckpt_io.rng_state(), path / f"rng_rank{self.world.rank}.pt")
        dist.barrier()
        if self.world.is_main:
            from sigma_moe.config import save_config

            save_config(self.cfg, path / "config.yaml")
            meta = ckpt_io.build_meta(
                step,
                trainer.state.consumed_samples,
                trainer.tokenizer.fingerprint,
                self.cfg.parallel.ep_size,
                self.world.world_size,
                {"global_batch_size": self.cfg.train.global_batch_size},
            )
            tmp = path / (ckpt_io.META + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path / ckpt_io.META)
            tmp_latest = self.root / "latest.tmp"
            tmp_latest.write_text(tag)
            os.replace(tmp_latest, self.root / "latest")
            self._prune()
        dist.barrier()
        self.last_saved = step
        return path

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / ckpt_io.META).is_file())
        for p in done[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def on_step_end(self, trainer, m):
        step = m["step"]
        if step % self.cfg.checkpoint.every == 0 or trainer.stop_requested is not None:
            self.save(trainer)

    def on_train_end(self, trainer, last):
        if trainer.state.step > 0 and self.last_saved != trainer.state.step:
            self.save(trainer)


class NanGuard:
    """`train.nan_policy`: skip (up to `nan_max_skips` non-finite steps, weights untouched) or
    stop; stopping saves a checkpoint of the last good weights first."""

    def __init__(self, cfg, checkpointer: Checkpointer):
        self.cfg, self.ckpt = cfg, checkpointer

    def on_step_end(self, trainer, m):
        if not m["nonfinite"]:
            return
        trainer.state.nan_skips += 1
        tr = self.cfg.train
        if tr.nan_policy == "stop" or trainer.state.nan_skips > tr.nan_max_skips:
            path = self.ckpt.save(trainer)
            from sigma_moe.train.loop import TrainingStopped

            raise TrainingStopped(
                f"non-finite loss at step {m['step']} ({trainer.state.nan_skips} so far, "
                f"train.nan_policy={tr.nan_policy}, train.nan_max_skips={tr.nan_max_skips}); "
                f"the last good weights are saved in {path}"
            )
        if trainer.world.is_main:
            print(
                f"[nan] step {m['step']}: non-finite loss, update skipped "
                f"({trainer.state.nan_skips}/{tr.nan_max_skips})",
                file=sys.stderr,
            )


class Summary:
    """End-of-run table (rank 0) and plots; the dict goes to summary.json and run_training."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.tps, self.loads = out_dir, [], []

    def on_step_end(self, trainer, m):
        self.tps.append(m["tokens_per_s"])
        self.loads.append(
            statistics.mean(v for k, v in m.items() if k.startswith("expert_load_max/"))
        )

    def on_train_end(self, trainer, last):
        hist = trainer.state.extra.get("eval_history", [])
        summary: dict[str, Any] = {
            "steps": trainer.state.step,
            "tokens": trainer.state.tokens,
            "final_loss": last.get("loss"),
            "tokens_per_s_median": statistics.median(self.tps) if self.tps else None,
            "expert_load_max_final": self.loads[-1] if self.loads else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if hist:
            summary["first_eval"], summary["last_eval"] = hist[0], hist[-1]
        trainer.state.extra["summary"] = summary
        if not trainer.world.is_main:
            return
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary), file=sys.stderr)
        try:
            from sigma_moe.train.plots import plot_run

            plot_run(self.out_dir)
        except Exception as e:  # a missing plot must never fail a finished run
            print(f"[plots] skipped: {e}", file=sys.stderr)


def format_summary(s: dict[str, Any]) -> str:
    lines = ["", f"== run summary: {s['steps']} steps, {s['tokens']:,} tokens =="]
    first, last = s.get("first_eval"), s.get("last_eval")
    if first and last:
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
    return "\n".join(lines)


def default_callbacks(cfg, out_dir: Path, world, resume: str) -> list:
    ck = Checkpointer(cfg, out_dir, world, resume)
    # Order matters on step end: evaluate first, so a checkpoint carries that step's eval.
    cbs: list = [Evaluator(), NanGuard(cfg, ck), ck]
    if world.is_main:
        cbs.append(MetricsWriter(out_dir / "metrics.jsonl"))
        if cfg.logging.progress:
            cbs.append(ProgressBar())
        if cfg.logging.wandb_mode != "disabled":
            cbs.append(WandbLogger(cfg, out_dir))
        cbs.append(Summary(out_dir))
    else:
        cbs.append(Summary(out_dir))
    return cbs
