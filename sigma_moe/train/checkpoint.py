"""Checkpoints: DeepSpeed's save/load plus what DeepSpeed does not know (loop state, RNG, config,
tokenizer fingerprint, code version), and loading a checkpoint for inference without DeepSpeed.

Layout of `<run>/checkpoints/`:
    step_00000100/              one complete checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, layer_<i>_expert_<r>_mp_rank_00_model_states.pt, ...
        meta.json               step, consumed samples, tokenizer fingerprint, ep_size, version
        config.yaml             the resolved run config
        rng_rank<r>.pt          every rank's RNG states
    latest                      name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

import sigma_moe

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's `checkpoints/` folder (→ its newest complete checkpoint), a run folder, or one
    checkpoint folder. Raises FileNotFoundError naming the path."""
    p = Path(path)
    if (p / "checkpoints").is_dir() and not (p / META).exists():
        p = p / "checkpoints"
    if (p / META).is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (p / tag / META).is_file():
            return p / tag
        raise FileNotFoundError(f"checkpoint {p / tag} named by {latest} is incomplete (no {META})")
    raise FileNotFoundError(
        f"no checkpoint at {p}: expected a checkpoints/ folder with a 'latest' "
        f"file or a checkpoint folder holding {META}"
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint metadata {ckpt / META} is unreadable: {e}") from e


def rng_state() -> dict[str, Any]:
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


def build_meta(
    step: int,
    consumed_samples: int,
    tokenizer_fingerprint: str,
    ep_size: int,
    world_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "step": step,
        "consumed_samples": consumed_samples,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "ep_size": ep_size,
        "world_size": world_size,
        "version": sigma_moe.__version__,
        **(extra or {}),
    }


def _expert_files(ckpt: Path) -> dict[int, list[Path]]:
    """layer index → the per-EP-rank expert files, in EP-rank order."""
    out: dict[int, dict[int, Path]] = {}
    for f in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        parts = f.name.split("_")
        out.setdefault(int(parts[1]), {})[int(parts[3])] = f
    return {layer: [files[r] for r in sorted(files)] for layer, files in out.items()}


def load_full_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Module state dict with every expert of every layer (EP slices concatenated in order)."""
    main = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = dict(main["module"])
    for _layer, files in sorted(_expert_files(ckpt).items()):
        slices: dict[str, list[torch.Tensor]] = {}
        for r, f in enumerate(files):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            for k, v in sd.items():
                # DeepSpeed names the stacked local block by its global "expert" id (= EP rank).
                key = k.replace(f"deepspeed_experts.{r}.", "deepspeed_experts.0.")
                slices.setdefault(key, []).append(v)
        for k, vs in slices.items():
            state[k] = torch.cat(vs, dim=0)
    return state


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model of a checkpoint (all experts, EP=1) and load its weights, without
    DeepSpeed. Returns (model in eval mode, run config dict, meta dict)."""
    from sigma_moe.config import config_from_dict
    from sigma_moe.data.tokenizer import load_tokenizer
    from sigma_moe.model import SigmaMoEForCausalLM
    from sigma_moe.train.engine import build_model_config

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg_dict = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg = config_from_dict(cfg_dict)
    cfg.parallel.ep_size = 1
    tok = load_tokenizer(cfg.data.tokenizer)
    model = SigmaMoEForCausalLM(build_model_config(cfg, tok.vocab_size))
    state = load_full_state_dict(ckpt)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model its config describes: {e}"
        ) from e
    return model.float().to(device).eval(), cfg_dict, meta


# --------------------------------------------------------------------------- callbacks


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
            ckpt = resolve_checkpoint(self.root if self.resume == "auto" else self.resume)
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
        meta = read_meta(ckpt)
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
            set_rng_state(torch.load(rng, weights_only=False))
        self.last_saved = trainer.state.step
        if self.world.is_main:
            print(f"[resume] from {ckpt} (step {trainer.state.step})", file=sys.stderr)

    def save(self, trainer) -> Path:
        step = trainer.state.step
        tag = tag_for(step)
        client = {"train_state": asdict(trainer.state)}
        trainer.engine.save_checkpoint(
            str(self.root), tag=tag, client_state=client, save_latest=False
        )
        path = self.root / tag
        torch.save(rng_state(), path / f"rng_rank{self.world.rank}.pt")
        dist.barrier()
        if self.world.is_main:
            from sigma_moe.config import save_config

            save_config(self.cfg, path / "config.yaml")
            meta = build_meta(
                step,
                trainer.state.consumed_samples,
                trainer.tokenizer.fingerprint,
                self.cfg.parallel.ep_size,
                self.world.world_size,
                {"global_batch_size": self.cfg.train.global_batch_size},
            )
            tmp = path / (META + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path / META)
            tmp_latest = self.root / "latest.tmp"
            tmp_latest.write_text(tag)
            os.replace(tmp_latest, self.root / "latest")
            self._prune()
        dist.barrier()
        self.last_saved = step
        return path

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / META).is_file())
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
