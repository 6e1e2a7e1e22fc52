"""The checkpoint callback: WHEN to save (every `checkpoint.every` steps, at the end, on a stop
signal; this callback is the only owner of the SIGTERM/SIGINT handlers) and how: DeepSpeed's
save/load plus what DeepSpeed does not know (loop state, component states, RNG, config,
tokenizer fingerprint, model shapes, code version), atomic publication, `--resume auto` that
skips damaged checkpoints. The on-disk format (names, meta.json, manifest, resolving a path,
shape checks) is `sigma_moe.model.checkpoint_format`; loading a model for inference
`sigma_moe.model.inference`; other layouts `sigma_moe.train.reshape`; the NaN policy
`sigma_moe.train.nan_policy`.

What is saved where. DeepSpeed: weights, optimizer state (ZeRO partitions), its step counters.
Client state of the DeepSpeed checkpoint, `train_state`: the loop's `TrainState` (step, consumed
samples, tokens, NaN skips) and `components`, ONE dict of the named resumable states of the
run's stateful components (`Trainer.components`: "sampler", "objective", "callbacks/<name>";
see `sigma_moe.train.hooks`), e.g. the sampler's weights, the Evaluator's eval history,
ExpertLoadByDomain's sums. A resume restores each exactly and refuses a checkpoint that lacks a
stateful component's state (naming it). Checkpoints written before components had their own
state keep it in `train_state["extra"]`; `legacy_component_states` reads that layout (a
component it has no entry for starts afresh, as the old loader did). Not saved because derived
from the step: the learning rate (the loop sets it from its own step counter), progressive
sparsification (top-k by step) and the data order (sample index = step x global batch).

Atomicity. Every rank writes into `step_<N>.tmp-<pid of rank 0>`; after a barrier, rank 0 adds
config.yaml and meta.json (with the manifest), renames the folder to `step_<N>` and only then
replaces `latest` (write + rename). A process killed at any point leaves either a `.tmp-*`
folder (ignored, removed at the next start) or a complete checkpoint. A failed write (disk full)
removes the temporary folder and raises `CheckpointError`; the previous checkpoint and `latest`
are untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigma_moe import errors
from sigma_moe.fs import fsync_dir, write_atomic
from sigma_moe.model.checkpoint_format import (
    META,
    build_meta,
    folder_manifest,
    global_param_shapes,
    list_checkpoints,
    model_config_record,
    read_meta,
    resolve_checkpoint,
    rng_file,
    router_bias_problem,
    saved_router_bias,
    shape_mismatch,
    tag_for,
)
from sigma_moe.train import reshape
from sigma_moe.train.collectives import agree_any, barrier, broadcast
from sigma_moe.train.hooks import Callback
from sigma_moe.train.log import log

# A second stop signal this soon after the first is the same request, forwarded again (see
# Checkpointer._install_stop_handlers).
_REPEAT_S = 0.5


CheckpointError = errors.CheckpointError  # the message names the checkpoint that survives

# `train_state["extra"]` keys of checkpoints written before components had their own state,
# and the component each belongs to now (the Rho-1 scorer status and the summary were
# telemetry, never read back: dropped).
_LEGACY_EXTRA = {
    "sampler": "sampler",
    "eval_history": "callbacks/Evaluator",
    "expert_load": "callbacks/ExpertLoadByDomain",
}


def legacy_component_states(extra: dict[str, Any]) -> dict[str, Any]:
    """The component states of an old checkpoint's `train_state["extra"]` (see the module doc)."""
    out = {}
    for key, comp in _LEGACY_EXTRA.items():
        if key in extra:
            out[comp] = {"history": extra[key]} if key == "eval_history" else extra[key]
    return out


class NonFiniteWeights(CheckpointError):
    """The weights hold NaN/Inf: no checkpoint is written (it would be called good and resumed
    from); the message names the parameter and the last checkpoint that survives."""


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding a NaN or Inf (None = all finite)."""
    for n, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return n.removeprefix("_orig_mod.")
    return None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, cuda): its `rng_rank<r>.pt`."""
    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _optimizer_param_names(trainer) -> list[list[str]] | None:
    """Without ZeRO the optimizer state is indexed by parameter position (DeepSpeed's
    `expp_rank_*_optim_states.pt`): record the names in that order so a reshape can map them.
    None under ZeRO 1/2 (its files carry `param_slice_mappings`)."""
    opt = trainer.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    names = {id(p): n.removeprefix("_orig_mod.") for n, p in trainer.model.named_parameters()}
    groups = getattr(base, "param_groups", None) or []
    if not groups or not all(id(p) in names for g in groups for p in g["params"]):
        return None
    return [[names[id(p)] for p in g["params"]] for g in groups]


# --------------------------------------------------------------------------- callbacks


@dataclass(frozen=True)
class RunFacts:
    """What the checkpointer needs of the other config sections (its builder,
    `sigma_moe.train.callbacks.default_callbacks`, passes them in)."""

    ep_size: int  # parallel.ep_size
    zero_stage: int  # parallel.zero_stage as it runs (effective_zero_stage)
    global_batch_size: int  # train.global_batch_size: a resume with another one is refused
    router_bias_start_zero: bool  # model.router_bias_start_zero
    data_identity: dict[str, Any]  # keys whose change re-maps the data order (resume warns)
    save_config: Callable[[Path], None]  # writes the resolved run config (config.yaml)


class Checkpointer(Callback):
    """Save every `checkpoint.every` steps, at the end and on SIGTERM/SIGINT (the ranks agree on
    `trainer.stop_requested`, this saves, the loop exits); resume before training starts.

    `resume`: "none", "auto" (newest complete checkpoint under <run>/checkpoints, skipping
    damaged ones with a warning naming them; a fresh start if there is none, an error if every
    one is damaged) or a path (a checkpoints/ folder, a run folder or one checkpoint; an error
    if it cannot be loaded). A checkpoint of another EP size, process count or ZeRO stage is
    reshaped on load (`sigma_moe.train.reshape`). `cfg`: the `checkpoint` section (every,
    keep_last); `facts`: the values of other sections it needs."""

    def __init__(self, cfg, out_dir: Path, world, resume: str, facts: RunFacts):
        self.cfg, self.root, self.world, self.resume = cfg, out_dir / "checkpoints", world, resume
        self.facts = facts
        self.last_saved = -1
        self.failed = False  # a save failed: do not try again at the end of the run
        self._signal: str | None = None
        self._signal_t = 0.0
        self._pid0: int | None = None
        # The handlers before this run's (restored at its end, so a Ctrl-C between the stages
        # of a multi-stage command stops it at once instead of being swallowed).
        self._prev_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    # ---------------------------------------------------------------- resume

    def _clean_stale(self) -> None:
        """Remove temporary folders a killed save left behind (rank 0, before any save)."""
        if not self.world.is_main or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith("step_") and (".tmp-" in p.name or ".old-" in p.name):
                log(f"[checkpoint] removing unfinished save {p}")
                shutil.rmtree(p, ignore_errors=True)

    def _install_stop_handlers(self, trainer) -> None:
        """SIGTERM/SIGINT stop the run after the current step, with a checkpoint. With several
        processes a signal may reach the ranks at different moments; if one rank left the loop a
        step before the others, their collectives would no longer pair up. So a signal is only
        recorded here and the ranks agree at the end of every step (`on_step_end`); a single
        process sets `trainer.stop_requested` right away (the loop stops after the step). No
        other part of the package installs these handlers. A second Ctrl-C (SIGINT) stops
        at once (KeyboardInterrupt, no checkpoint). Repeated SIGTERMs and a signal within
        `_REPEAT_S` of the first are the same request: launchers forward one stop several times
        (the DeepSpeed launcher's own SIGTERM reached the ranks right after pretrain.sh's, and
        a "second signal" there threw away the checkpoint of test_launcher_sigterm...)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            now = time.monotonic()
            if self._signal is not None:
                if signum == signal.SIGINT and now - self._signal_t >= _REPEAT_S:
                    self._restore_handlers()
                    raise KeyboardInterrupt(f"second {name}: stopped at once, without a checkpoint")
                return
            self._signal, self._signal_t = name, now
            if self.world.is_main:
                log(
                    f"[checkpoint] {name}: stopping after this step with a checkpoint "
                    "(Ctrl-C again to stop at once)"
                )
            if self.world.world_size == 1:
                trainer.stop_requested = self._signal

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, handler)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._prev_handlers.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def on_resume(self, trainer):
        self._install_stop_handlers(trainer)
        try:
            self._resume(trainer)
        except BaseException:
            self._restore_handlers()  # on_train_end will not run
            raise

    def _resume(self, trainer) -> None:
        self._pid0 = broadcast(os.getpid())
        self._clean_stale()
        barrier()
        if self.resume in (None, "none"):
            return
        target = self.root if self.resume == "auto" else Path(self.resume)
        # Rank 0 decides (warnings once), every rank loads the same checkpoint.
        choice: str | None = None
        err: str | None = None
        if self.world.is_main:
            try:
                choice = str(resolve_checkpoint(target))
            except FileNotFoundError as e:
                err = str(e)
        choice, err = broadcast((choice, err))
        if choice is None:
            if self.resume == "auto" and not list_checkpoints(self.root):
                if self.world.is_main:
                    log(f"[resume] no complete checkpoint under {self.root}; starting fresh")
                return
            raise FileNotFoundError(err)
        self.load(trainer, Path(choice))

    def _check_compatible(self, trainer, ckpt: Path, meta: dict[str, Any]) -> None:
        fp = trainer.tokenizer.fingerprint
        if meta.get("tokenizer_fingerprint") not in (None, fp):
            raise ValueError(
                f"checkpoint {ckpt} was trained with tokenizer {meta['tokenizer_fingerprint']}, "
                f"the config's data.tokenizer is {fp}"
            )
        f = self.facts
        problem = shape_mismatch(ckpt, meta, trainer.model, f.ep_size)
        problem = problem or router_bias_problem(
            ckpt, meta, trainer.model, f.router_bias_start_zero
        )
        if problem:
            raise ValueError(problem)
        old_gbs = meta.get("global_batch_size")
        if old_gbs is not None and old_gbs != f.global_batch_size:
            raise ValueError(
                f"config key 'train.global_batch_size': the checkpoint {ckpt} was trained with "
                f"{old_gbs}, the config says {f.global_batch_size}; resuming would "
                "re-map the data order, so it is refused (start a new run from its weights instead)"
            )
        if self.world.is_main:
            data_now = f.data_identity
            changed = [
                k
                for k, v in (meta.get("data_identity") or {}).items()
                if k in data_now and data_now[k] != v
            ]
            if changed:
                log(
                    f"[resume] warning: {', '.join(changed)} changed since checkpoint {ckpt}: "
                    "the data order after the resume point differs from the original run's"
                )

    def load(self, trainer, ckpt: Path) -> None:
        meta = read_meta(ckpt)
        self._check_compatible(trainer, ckpt, meta)
        same_layout = (
            meta.get("format", "deepspeed") == "deepspeed"
            and meta.get("ep_size") == self.facts.ep_size
            and meta.get("world_size") == self.world.world_size
            and meta.get("zero_stage", self.facts.zero_stage) == self.facts.zero_stage
        )
        if same_layout:
            try:
                _, client = trainer.engine.load_checkpoint(
                    str(ckpt.parent),
                    tag=ckpt.name,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    # a bias-less checkpoint into a biased run (allowed by the check above):
                    # the missing bias buffers keep their zeros; parameters were checked.
                    load_module_strict=saved_router_bias(meta)
                    == trainer.model.config.router_bias_update,
                )
            except (RuntimeError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"checkpoint {ckpt} could not be loaded by DeepSpeed: {e}") from e
            if client is None:
                raise ValueError(f"checkpoint {ckpt} could not be loaded by DeepSpeed")
            st = client["train_state"]
        else:
            if self.world.is_main:
                log(
                    f"[resume] reshaping {ckpt} (ep_size {meta.get('ep_size')}, "
                    f"{meta.get('world_size') or '-'} processes) to ep_size "
                    f"{self.facts.ep_size} on {self.world.world_size} processes"
                )
            st = reshape.load_reshaped(trainer, ckpt, meta, self.facts.ep_size)
        trainer.state.step, trainer.state.consumed_samples = st["step"], st["consumed_samples"]
        trainer.state.tokens, trainer.state.nan_skips = st["tokens"], st["nan_skips"]
        self._load_components(trainer, ckpt, st)
        rng = ckpt / rng_file(self.world.rank)
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        self.last_saved = trainer.state.step
        if self.world.is_main:
            log(f"[resume] from {ckpt} (step {trainer.state.step})")
            self._trim_metrics(trainer.state.step)

    def _load_components(self, trainer, ckpt: Path, st: dict[str, Any]) -> None:
        """Restore every stateful component of the run from the checkpoint's `components`."""
        comps = trainer.components
        if "components" in st:
            saved = st["components"]
            missing = [k for k in comps if k not in saved]
            if missing:
                raise ValueError(
                    f"checkpoint {ckpt} holds no state for the component(s) "
                    f"{', '.join(missing)} of this run (it was saved by a run without them); "
                    "starting them afresh mid-run would not continue the run exactly, so the "
                    "resume is refused (start a new run from its weights instead)"
                )
        else:  # written before components had their own state
            saved = legacy_component_states(st.get("extra") or {})
        unused = sorted(set(saved) - set(comps))
        if unused and self.world.is_main:
            log(
                f"[resume] warning: checkpoint {ckpt} holds state this run has no use for: {unused}"
            )
        for key, comp in comps.items():
            if key in saved:
                comp.load_state_dict(saved[key])

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics.jsonl lines of steps after the resume point (a killed run logged them;
        they are trained again and re-logged), so every step appears once."""
        path = self.root.parent / "metrics.jsonl"
        if not path.is_file():
            return
        keep, dropped = [], 0
        for line in path.read_text().splitlines(keepends=True):
            try:
                late = json.loads(line).get("step", 0) > step
            except (json.JSONDecodeError, AttributeError):
                late = True  # a line cut short by the kill
            if late:
                dropped += 1
            else:
                keep.append(line)
        if dropped:
            write_atomic(path, "".join(keep))
            log(f"[resume] metrics.jsonl: dropped {dropped} line(s) after step {step}")

    # ---------------------------------------------------------------- save

    def _meta(self, trainer, path: Path) -> dict[str, Any]:
        manifest = folder_manifest(path)
        return build_meta(
            trainer.state.step,
            trainer.state.consumed_samples,
            trainer.tokenizer.fingerprint,
            self.facts.ep_size,
            self.world.world_size,
            {
                "format": "deepspeed",
                "zero_stage": self.facts.zero_stage,
                "global_batch_size": self.facts.global_batch_size,
                "data_identity": self.facts.data_identity,
                "model_config": model_config_record(trainer.model),
                "param_shapes": global_param_shapes(trainer.model, self.facts.ep_size),
                **manifest,
                "optimizer_param_names": _optimizer_param_names(trainer),
            },
        )

    def save(self, trainer) -> Path:
        """Write the checkpoint of the current step (all ranks). Atomic; see the module doc."""
        step = trainer.state.step
        tag = tag_for(step)
        if self._pid0 is None:
            self._pid0 = broadcast(os.getpid())
        tmp_tag = f"{tag}.tmp-{self._pid0}"
        tmp, final = self.root / tmp_tag, self.root / tag
        self._refuse_nonfinite(trainer, final)
        states = {k: c.state_dict() for k, c in trainer.components.items()}
        client = {"train_state": {**asdict(trainer.state), "components": states}}
        err: BaseException | None = None
        try:
            trainer.engine.save_checkpoint(
                str(self.root), tag=tmp_tag, client_state=client, save_latest=False
            )
            torch.save(rng_state(), tmp / rng_file(self.world.rank))
        except Exception as e:  # disk full, permissions, ...: every rank must learn about it
            err = e
        failed = agree_any(err is not None)
        if not failed and self.world.is_main:
            try:
                self._publish(trainer, tmp, final, tag)
            except Exception as e:
                err = e
        failed = agree_any(err is not None)
        if failed:
            self.failed = True
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            kept = self._surviving()
            why = f"{err}" if err is not None else "another rank failed to write its part"
            hint = (
                " (disk full: free space or point the run at another disk)"
                if isinstance(err, OSError) and err.errno == errno.ENOSPC
                else ""
            )
            raise CheckpointError(
                f"could not write checkpoint {final} at step {step}: {why}{hint}; {kept}"
            ) from err
        barrier()
        self.last_saved = step
        return final

    def _surviving(self) -> str:
        prev = self.root / "latest"
        prev_name = prev.read_text().strip() if prev.is_file() else None
        if prev_name:
            return f"the previous checkpoint {self.root / prev_name} is intact and 'latest' still names it"
        return "no earlier checkpoint exists"

    def _refuse_nonfinite(self, trainer, final: Path) -> None:
        """Never publish NaN/Inf weights as a checkpoint (every rank checks its own shard)."""
        bad = nonfinite_parameter(trainer.model)
        if not agree_any(bad is not None):
            return
        self.failed = True  # no save at the end of the run either
        raise NonFiniteWeights(
            f"the weights at step {trainer.state.step} are not finite "
            f"({bad or 'a parameter on another rank'} holds NaN/Inf), so {final.name} was not "
            f"written; {self._surviving()} (resume from it with --resume auto after lowering "
            "train.lr or checking the data)"
        )

    def _publish(self, trainer, tmp: Path, final: Path, tag: str) -> None:
        self.facts.save_config(tmp / "config.yaml")
        meta = self._meta(trainer, tmp)
        with open(tmp / META, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if final.exists():  # e.g. a damaged checkpoint of this step that the resume skipped
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_atomic(self.root / "latest", tag)  # fsyncs the folder too
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        done = [p for p in list_checkpoints(self.root) if (p / META).is_file()]
        for p in done[self.cfg.keep_last :]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def on_step_end(self, trainer, m):
        step = m["step"]
        if self.world.world_size > 1:  # every rank stops after the same step (see above)
            local = self._signal or trainer.stop_requested
            if agree_any(local is not None) and trainer.stop_requested is None:
                trainer.stop_requested = local or "signal on another rank"
        if step % self.cfg.every == 0 or trainer.stop_requested is not None:
            self.save(trainer)
            if trainer.stop_requested is not None and self.world.is_main:
                log(
                    f"[checkpoint] {trainer.stop_requested}: saved step {step}; stopping "
                    "(resume with --resume auto)"
                )

    def on_train_end(self, trainer, last):
        self._restore_handlers()
        if self.failed or sys.exc_info()[0] is not None:
            return  # a failed save or a crash: never write a checkpoint of unknown state
        if trainer.state.step > 0 and self.last_saved != trainer.state.step:
            self.save(trainer)
            if trainer.stop_requested is not None and self.world.is_main:
                log(
                    f"[checkpoint] {trainer.stop_requested}: saved step {trainer.state.step}; "
                    "stopping (resume with --resume auto)"
                )
