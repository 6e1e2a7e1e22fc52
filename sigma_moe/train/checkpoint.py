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
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
    for layer, files in sorted(_expert_files(ckpt).items()):
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
