"""The on-disk checkpoint format, in one place: names, meta.json, the manifest, finding
("resolving") a checkpoint, and the shape checks against the model that is to load it. Every
reader and writer uses it: the trainer's checkpoint callback (`sigma_moe.train.checkpoint`), the
reshape (`sigma_moe.train.reshape`), the inference reader (`sigma_moe.model.checkpoint_io`: eval,
generate, the Rho-1 reference, `from_checkpoint`) and the HF export. It lives in the model layer
because the inference reader does; it imports nothing above it.

Layout of `<run>/checkpoints/`:
    step_00000100/              one complete checkpoint (`tag_for(step)`)
        mp_rank_00_model_states.pt (MAIN_STATES), layer_<i>_expert_<r>_mp_rank_00_model_states.pt,
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...      (DeepSpeed's files)
        universal_state.pt      (UNIVERSAL) instead, in a checkpoint `convert-checkpoint` wrote
        rng_rank<r>.pt          every rank's RNG states (`rng_file`)
        config.yaml             the resolved run config
        meta.json               (META) written last: step, consumed samples, tokenizer
                                fingerprint, ep/world size, ZeRO stage, model config and shapes,
                                code version and the manifest
    latest                      name of the newest complete checkpoint

Manifest (in meta.json): `files` maps every file to its size and `checksums` to its sha256.
Sizes alone let a same-size corruption of a tensor record through (issue 15: `eval` on one
printed clean_val_loss 85.39 instead of 8.55 with exit 0), so the content is hashed. sha256
(hashlib, ~700 MB/s on this machine's one core; crc32 would be ~1.6 GB/s but zip entries already
carry one and a manifest hash also covers the yaml/json files) costs about 1.5 s per GB at save
and at load. Checkpoints older than `checksums` fall back to the CRC32 of every zip entry
(`ZipFile.testzip`, which torch archives carry).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

import sigma_moe

META = "meta.json"
UNIVERSAL = "universal_state.pt"  # layout-free state written by `sigma-moe convert-checkpoint`
MAIN_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's dense weights + our client state


def tag_for(step: int) -> str:
    """The folder name of the checkpoint of `step`."""
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- meta.json


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint metadata {ckpt / META} is unreadable: {e}") from e


def model_config_record(model: torch.nn.Module) -> dict[str, Any]:
    """What `meta.json` keeps as `model_config`: every config field, top-k as it runs now."""
    rec = dataclasses.asdict(model.config)
    rec["router_topk"] = list(model.current_topk())
    return rec


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    v = sigma_moe.__version__
    try:
        root = Path(sigma_moe.__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(
                [
                    "git",
                    "-C",
                    str(root),
                    "diff",
                    "--quiet",
                    "HEAD",
                    "--",
                    "sigma_moe",
                    "sigma_moe_kernels",
                ],
                capture_output=True,
                timeout=5,
            )
            v += f"+g{out.stdout.strip()}" + (".dirty" if dirty.returncode else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def global_param_shapes(model: torch.nn.Module, ep_size: int) -> dict[str, list[int]]:
    """Parameter shapes of the whole model (expert tensors with every expert, not this rank's)."""
    out = {}
    for n, p in model.named_parameters():
        shape = list(p.shape)
        if is_expert_param(p):
            shape[0] *= ep_size
        out[n.removeprefix("_orig_mod.")] = shape
    return out


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
        "version": code_version(),
        **(extra or {}),
    }


# --------------------------------------------------------------------------- shape checks


# SigmaMoEConfig fields that decide parameter shapes, with the config key a user changes.
SHAPE_FIELDS = {
    "vocab_size": "data.tokenizer (vocabulary size)",
    "num_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "num_attention_heads": "model.num_attention_heads",
    "num_kv_heads": "model.num_kv_heads",
    "head_dim": "model.head_dim",
    "num_experts": "model.num_experts",
    "moe_ffn_size": "model.moe_ffn_size",
    "tie_embeddings": "model.tie_embeddings",
}


def shape_mismatch(ckpt: Path, meta: dict[str, Any], model, ep_size: int) -> str | None:
    """A message naming how the checkpoint's model differs from `model` (None = same shapes)."""
    saved = meta.get("param_shapes")
    if saved is None:
        return None
    now = global_param_shapes(model, ep_size)
    if saved == now:
        return None
    diffs = []
    old_cfg, new_cfg = meta.get("model_config") or {}, getattr(model, "config", None)
    if new_cfg is not None:
        for f, key in SHAPE_FIELDS.items():
            a, b = old_cfg.get(f), getattr(new_cfg, f, None)
            if a is not None and a != b:
                diffs.append(f"{key}: {a} in the checkpoint, {b} now")
    pdiff = []
    for n in sorted(set(saved) | set(now)):
        a, b = saved.get(n), now.get(n)
        if a != b:
            pdiff.append(
                f"{n}: "
                + (
                    "missing now"
                    if b is None
                    else "not in the checkpoint"
                    if a is None
                    else f"{a} vs {b}"
                )
            )
    shown = "; ".join(pdiff[:4]) + (f"; … {len(pdiff) - 4} more" if len(pdiff) > 4 else "")
    return (
        f"checkpoint {ckpt} holds a model of another shape than the config builds: "
        + ("; ".join(diffs) + ". " if diffs else "")
        + f"Parameters that differ: {shown}"
    )


def saved_router_bias(meta: dict[str, Any]) -> str:
    return (meta.get("model_config") or {}).get("router_bias_update", "none")


def router_bias_problem(ckpt: Path, meta: dict[str, Any], model, start_zero: bool) -> str | None:
    """The aux-loss-free router bias is a buffer, not a parameter, so `shape_mismatch` cannot see
    it; a message when the checkpoint and the run disagree on having one (None = fine)."""
    saved, now = saved_router_bias(meta), model.config.router_bias_update
    if saved == now or (saved == "none" and start_zero):
        return None
    if now == "none":
        return (
            f"checkpoint {ckpt} holds an aux-loss-free router bias (model.router_bias_update="
            f"{saved!r}) but the config says model.router_bias_update='none': dropping the bias "
            f"would change which experts every token picks; set model.router_bias_update={saved}"
        )
    return (
        f"checkpoint {ckpt} was saved without a router bias (model.router_bias_update={saved!r})"
        f" but the config says model.router_bias_update={now!r}; set "
        "model.router_bias_start_zero=true to start the bias at zero from this checkpoint"
    )


# --------------------------------------------------------------------------- manifest, resolve


def _is_final_name(p: Path) -> bool:
    n = p.name
    return n.startswith("step_") and n[5:].isdigit()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders with a final name (`step_<N>`, no temporary suffix), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _is_final_name(p)]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def file_sha256(f: Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_manifest(folder: Path) -> dict[str, dict]:
    """`files` (name → size) and `checksums` (name → sha256) of every file but meta.json."""
    names = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name != META)
    return {
        "files": {n: (folder / n).stat().st_size for n in names},
        "checksums": {n: file_sha256(folder / n) for n in names},
    }


def _zip_problem(f: Path) -> str | None:
    """torch.save writes zip archives: a truncated one has no readable central directory, a
    damaged record fails its CRC32."""
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        return f"{f.name} is not a readable torch archive ({e}; truncated or damaged)"
    if bad is not None:
        return f"{f.name}: record {bad!r} fails its CRC check (damaged)"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (None = it is whole). Reads meta.json, compares every file of
    its manifest with the recorded size and sha256 (older checkpoints: each .pt archive's
    entry CRCs); it does not build tensors."""
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        return f"no {META} (the save did not finish)"
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{META} is unreadable ({e})"
    if not isinstance(meta, dict):
        return f"{META} is not a JSON object"
    files = meta.get("files")
    if files is None:  # older checkpoints without a manifest: the files we know must exist
        need = [MAIN_STATES] if meta.get("format") != "universal" else [UNIVERSAL]
        files = {n: None for n in need}
    sums = meta.get("checksums") or {}
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written (truncated or damaged)"
        if name in sums:
            if file_sha256(f) != sums[name]:
                return f"{name} does not match its sha256 in {META} (its content is damaged)"
        elif name.endswith(".pt"):
            problem = _zip_problem(f)
            if problem:
                return problem
    return None


def resolve_checkpoint(path: str | Path, *, warn: bool = True) -> Path:
    """A run's `checkpoints/` folder or run folder (→ its newest complete, undamaged checkpoint,
    skipping damaged ones with a warning naming them), or one checkpoint folder (checked).
    Raises FileNotFoundError naming the path."""
    p = Path(path)
    if (p / "checkpoints").is_dir() and not (p / META).exists():
        p = p / "checkpoints"
    if (p / META).is_file() or (_is_final_name(p) and p.is_dir()):
        problem = checkpoint_problem(p)
        if problem:
            raise FileNotFoundError(f"checkpoint {p} cannot be loaded: {problem}")
        return p
    cands = list_checkpoints(p)
    latest = p / "latest"
    if not cands:
        raise FileNotFoundError(
            f"no checkpoint at {p}: expected a checkpoints/ folder holding step_* checkpoints "
            f"or a checkpoint folder holding {META}"
        )
    for c in cands:
        problem = checkpoint_problem(c)
        if problem is None:
            if warn and latest.is_file() and latest.read_text().strip() != c.name:
                _warn(
                    f"[resume] warning: {latest} names {latest.read_text().strip()!r}, "
                    f"using {c.name} (the newest complete checkpoint)"
                )
            return c
        if warn:
            _warn(f"[resume] warning: skipping damaged checkpoint {c}: {problem}")
    raise FileNotFoundError(f"no loadable checkpoint under {p}: every candidate is damaged")
