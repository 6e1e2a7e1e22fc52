"""Checkpoints: DeepSpeed's save/load plus what DeepSpeed does not know (loop state, RNG, config,
tokenizer fingerprint, model shapes, code version), atomic publication, `--resume auto` that
skips damaged checkpoints, and loading a checkpoint for inference without DeepSpeed.

Layout of `<run>/checkpoints/`:
    step_00000100/              one complete checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, layer_<i>_expert_<r>_mp_rank_00_model_states.pt,
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...      (DeepSpeed)
        rng_rank<r>.pt          every rank's RNG states (python, numpy, torch, cuda)
        config.yaml             the resolved run config
        meta.json               written last: step, consumed samples, tokenizer fingerprint,
                                ep/world size, ZeRO stage, model shapes, code version and a
                                manifest (every file's size and sha256, see integrity.py)
    latest                      name of the newest complete checkpoint

What is saved where. DeepSpeed: weights, optimizer state (ZeRO partitions), its step counters.
`TrainState` (client state of the DeepSpeed checkpoint): step, consumed samples, tokens, NaN skips
and `extra`, the dict any callback puts its own resumable state in (eval history, the Rho-1
store position, ...). Not saved because derived from the step: the learning rate (the loop sets
it from its own step counter), progressive sparsification (top-k by step) and the data order
(sample index = step x global batch).

Atomicity. Every rank writes into `step_<N>.tmp-<pid of rank 0>`; after a barrier, rank 0 adds
config.yaml and meta.json (with the manifest), renames the folder to `step_<N>` and only then
replaces `latest` (write + rename). A process killed at any point leaves either a `.tmp-*`
folder (ignored, removed at the next start) or a complete checkpoint. A failed write (disk full)
removes the temporary folder and raises `CheckpointError`; the previous checkpoint and `latest`
are untouched.

Split out: `integrity.py` (finding checkpoints, the manifest's checksums, the checks before any
read) and `ckpt_state.py` (meta.json pieces, RNG states, compatibility checks); both re-exported.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from sigma_moe import errors
from sigma_moe.config import config_from_dict, save_config
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.model.checkpoint_io import (  # the weight reader lives with the model
    load_full_state_dict,
    model_config_record,
)
from sigma_moe.train import reshape
from sigma_moe.train.ckpt_state import (  # noqa: F401  (re-exported)
    SHAPE_FIELDS,
    build_meta,
    code_version,
    global_param_shapes,
    is_expert_param,
    read_meta,
    rng_state,
    router_bias_problem,
    saved_router_bias,
    set_rng_state,
    shape_mismatch,
)
from sigma_moe.train.collectives import agree_any, barrier, broadcast
from sigma_moe.train.fs import fsync_dir, log, write_atomic
from sigma_moe.train.hooks import Callback
from sigma_moe.train.integrity import (  # noqa: F401  (re-exported: rho1, tests)
    META,
    UNIVERSAL,
    checkpoint_problem,
    folder_manifest,
    list_checkpoints,
    nonfinite_parameter,
    resolve_checkpoint,
)

# A second stop signal this soon after the first is the same request, forwarded again (see
# Checkpointer._install_stop_handlers).
_REPEAT_S = 0.5


CheckpointError = errors.CheckpointError  # re-exported: the message names the one that survives


class NonFiniteWeights(CheckpointError):
    """The weights hold NaN/Inf: no checkpoint is written (it would be called good and resumed
    from); the message names the parameter and the last checkpoint that survives."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- inference loading


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model of a checkpoint (all experts, EP=1) and load its weights, without
    DeepSpeed. Returns (model in eval mode, run config dict, meta dict)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg_dict = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg = config_from_dict(cfg_dict)
    cfg.parallel.ep_size = 1
    tok = load_tokenizer(cfg.data.tokenizer)
    model = SigmaMoEForCausalLM(cfg.build_model(tok.vocab_size))
    state = load_full_state_dict(ckpt)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model its config describes: {e}"
        ) from e
    topk = (meta.get("model_config") or {}).get("router_topk")
    if topk:  # top-k as the layers ran at the saved step (progressive sparsification)
        model.set_topk(topk)
    return model.float().to(device).eval(), cfg_dict, meta


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


class Checkpointer(Callback):
    """Save every `checkpoint.every` steps, at the end and on SIGTERM/SIGINT (the ranks agree on
    `trainer.stop_requested`, this saves, the loop exits); resume before training starts.

    `resume`: "none", "auto" (newest complete checkpoint under <run>/checkpoints, skipping
    damaged ones with a warning naming them; a fresh start if there is none, an error if every
    one is damaged) or a path (a checkpoints/ folder, a run folder or one checkpoint; an error
    if it cannot be loaded). A checkpoint of another EP size, process count or ZeRO stage is
    reshaped on load (`sigma_moe.train.reshape`)."""

    def __init__(self, cfg, out_dir: Path, world, resume: str):
        self.cfg, self.root, self.world, self.resume = cfg, out_dir / "checkpoints", world, resume
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
        process stops right away as the loop's own handler does. A second Ctrl-C (SIGINT) stops
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
        problem = shape_mismatch(ckpt, meta, trainer.model, self.cfg.parallel.ep_size)
        problem = problem or router_bias_problem(
            ckpt, meta, trainer.model, self.cfg.model.router_bias_start_zero
        )
        if problem:
            raise ValueError(problem)
        old_gbs = meta.get("global_batch_size")
        if old_gbs is not None and old_gbs != self.cfg.train.global_batch_size:
            raise ValueError(
                f"config key 'train.global_batch_size': the checkpoint {ckpt} was trained with "
                f"{old_gbs}, the config says {self.cfg.train.global_batch_size}; resuming would "
                "re-map the data order, so it is refused (start a new run from its weights instead)"
            )
        if self.world.is_main:
            data_now = self._data_identity()
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

    def _data_identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "train.max_steps": c.train.max_steps,
            "train.seed": c.train.seed,
            "data.seq_len": c.data.seq_len,
            "data.domains": [asdict(d) for d in c.data.domains],
        }

    def load(self, trainer, ckpt: Path) -> None:
        meta = read_meta(ckpt)
        self._check_compatible(trainer, ckpt, meta)
        same_layout = (
            meta.get("format", "deepspeed") == "deepspeed"
            and meta.get("ep_size") == self.cfg.parallel.ep_size
            and meta.get("world_size") == self.world.world_size
            and meta.get("zero_stage", self.cfg.parallel.zero_stage) == self.cfg.parallel.zero_stage
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
                    f"{self.cfg.parallel.ep_size} on {self.world.world_size} processes"
                )
            st = reshape.load_reshaped(trainer, ckpt, meta)
        trainer.state.step, trainer.state.consumed_samples = st["step"], st["consumed_samples"]
        trainer.state.tokens, trainer.state.nan_skips = st["tokens"], st["nan_skips"]
        trainer.state.extra.update(st.get("extra", {}))
        rng = ckpt / f"rng_rank{self.world.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        self.last_saved = trainer.state.step
        if self.world.is_main:
            log(f"[resume] from {ckpt} (step {trainer.state.step})")
            self._trim_metrics(trainer.state.step)

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
            self.cfg.parallel.ep_size,
            self.world.world_size,
            {
                "format": "deepspeed",
                "zero_stage": self.cfg.parallel.zero_stage,
                "global_batch_size": self.cfg.train.global_batch_size,
                "data_identity": self._data_identity(),
                "model_config": model_config_record(trainer.model),
                "param_shapes": global_param_shapes(trainer.model, self.cfg.parallel.ep_size),
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
        client = {"train_state": asdict(trainer.state)}
        err: BaseException | None = None
        try:
            trainer.engine.save_checkpoint(
                str(self.root), tag=tmp_tag, client_state=client, save_latest=False
            )
            torch.save(rng_state(), tmp / f"rng_rank{self.world.rank}.pt")
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
        save_config(self.cfg, tmp / "config.yaml")
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
        write_atomic(self.root / "latest", tag)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        done = [p for p in list_checkpoints(self.root) if (p / META).is_file()]
        for p in done[self.cfg.checkpoint.keep_last :]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def on_step_end(self, trainer, m):
        step = m["step"]
        if self.world.world_size > 1:  # every rank stops after the same step (see above)
            local = self._signal or trainer.stop_requested
            if agree_any(local is not None) and trainer.stop_requested is None:
                trainer.stop_requested = local or "signal on another rank"
        if step % self.cfg.checkpoint.every == 0 or trainer.stop_requested is not None:
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


class NanGuard(Callback):
    """`train.nan_policy`: skip (up to `nan_max_skips` non-finite steps, weights untouched) or
    stop; stopping saves a checkpoint of the last good weights first (its step counter is past
    the bad batch, so a resume does not replay it)."""

    def __init__(self, cfg, checkpointer: Checkpointer):
        self.cfg, self.ckpt = cfg, checkpointer

    def on_step_end(self, trainer, m):
        if not m["nonfinite"]:
            return
        trainer.state.nan_skips += 1
        tr = self.cfg.train
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
