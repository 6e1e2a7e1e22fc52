"""Reading a trained model out of a checkpoint folder, without DeepSpeed or the trainer.

This is the model layer's half of the checkpoint format (the trainer's half, saving, resuming
and reshaping, is `sigma_moe.train.checkpoint`, which imports the weight reader from here so
the two never drift apart). It needs only what the checkpoint itself records:

- `meta.json` → `model_config`: every `SigmaMoEConfig` field, with `router_topk` as the layers
  ran at the saved step (progressive sparsification included), written by
  `model_config_record` when the trainer saves;
- the weights: DeepSpeed's `mp_rank_00_model_states.pt` (dense part) plus one
  `layer_<i>_expert_<r>_mp_rank_00_model_states.pt` per MoE layer and expert-parallel rank, or
  the layout-free `universal_state.pt` written by `sigma-moe convert-checkpoint`.

ZeRO 0/1/2 all keep the full dense weights in the model-states file (only optimizer state is
partitioned), so the same reader serves every stage; expert slices of an EP>1 run are
concatenated in EP-rank order, which gives the EP=1 layout (experts are numbered globally as
rank·E/ep_size + local index, see `StackedExperts`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from sigma_moe.model.config import SigmaMoEConfig

META = "meta.json"
UNIVERSAL = "universal_state.pt"  # layout-free state written by `sigma-moe convert-checkpoint`
MAIN_STATES = "mp_rank_00_model_states.pt"


def model_config_record(model: torch.nn.Module) -> dict[str, Any]:
    """What `meta.json` keeps as `model_config`: every config field, top-k as it runs now."""
    rec = dataclasses.asdict(model.config)
    rec["router_topk"] = list(model.current_topk())
    return rec


def _expert_files(ckpt: Path) -> dict[int, list[Path]]:
    """layer index → the per-EP-rank expert files, in EP-rank order."""
    out: dict[int, dict[int, Path]] = {}
    for f in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        parts = f.name.split("_")
        out.setdefault(int(parts[1]), {})[int(parts[3])] = f
    return {layer: [files[r] for r in sorted(files)] for layer, files in out.items()}


def load_full_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Module state dict with every expert of every layer (EP slices concatenated in order)."""
    if (ckpt / UNIVERSAL).is_file():
        return dict(torch.load(ckpt / UNIVERSAL, map_location="cpu", weights_only=False)["module"])
    main = torch.load(ckpt / MAIN_STATES, map_location="cpu", weights_only=False)
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


def find_checkpoint(path: str | Path) -> Path:
    """One checkpoint folder (holding meta.json), or a run's `checkpoints/` folder or run folder
    → the checkpoint its `latest` file names (the newest complete one; a folder without
    `latest` → its newest `step_*` with a meta.json). FileNotFoundError names the path."""
    p = Path(path)
    if (p / META).is_file():
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    latest = p / "latest"
    if latest.is_file() and (p / latest.read_text().strip() / META).is_file():
        return p / latest.read_text().strip()
    steps = sorted(
        (c for c in p.glob("step_*") if c.name[5:].isdigit() and (c / META).is_file()),
        key=lambda c: int(c.name[5:]),
    )
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint at {p}: expected a checkpoint folder holding {META}, or a run's "
            "checkpoints/ folder holding step_* checkpoints"
        )
    return steps[-1]


def read_model_checkpoint(
    path: str | Path,
) -> tuple[SigmaMoEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(model config with ep_size 1, full state dict, meta.json) of the checkpoint at `path`."""
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint metadata {ckpt / META} is unreadable: {e}") from e
    rec = dict(meta.get("model_config") or {})
    known = {f.name for f in dataclasses.fields(SigmaMoEConfig)}
    if "router_topk" not in rec:
        raise ValueError(
            f"{ckpt / META} records only the model's shapes (written before full model configs "
            "were saved): load it with sigma_moe.train.checkpoint.load_model_for_inference"
        )
    unknown = sorted(set(rec) - known)
    if unknown:
        raise ValueError(
            f"{ckpt / META}: model_config fields {unknown} are unknown to this version of "
            "SigmaMoEConfig (saved by a newer sigma-moe?)"
        )
    rec["ep_size"] = 1
    cfg = SigmaMoEConfig(**rec)
    try:
        state = load_full_state_dict(ckpt)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"checkpoint {ckpt}: weights are unreadable: {e}") from e
    return cfg, {k.removeprefix("_orig_mod."): v for k, v in state.items()}, meta
