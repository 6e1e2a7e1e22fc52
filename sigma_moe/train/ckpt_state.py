"""What a checkpoint records besides the weights and how it is compared with the run resuming
it: meta.json pieces (code version, parameter shapes, model shape fields), the RNG states, and
the compatibility checks (another model shape, a router bias the run does not expect). Split
out of `checkpoint.py` (save / resume / publication), which re-exports these names."""

from __future__ import annotations

import functools
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sigma_moe
from sigma_moe.train.integrity import META

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


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint metadata {ckpt / META} is unreadable: {e}") from e


# --------------------------------------------------------------------------- state pieces


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
                ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "sigma_moe", "kernels"],
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
