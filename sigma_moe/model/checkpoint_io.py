"""Reading a trained model out of a checkpoint folder, without DeepSpeed or the trainer: THE
inference reader (`read_model_checkpoint`), used by `SigmaMoEForCausalLM.from_checkpoint`,
`sigma_moe.model.inference.load_model_for_inference` (eval, generate, the Rho-1 reference) and
the reshape's weight reading (`load_full_state_dict`). The format itself (names, meta.json,
manifest, resolving a path) is `sigma_moe.model.checkpoint_format`. It needs only what the
checkpoint records:

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
from pathlib import Path
from typing import Any

import torch

from sigma_moe.model.checkpoint_format import MAIN_STATES, UNIVERSAL, read_meta, resolve_checkpoint
from sigma_moe.model.config import SigmaMoEConfig


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


def model_config_of(ckpt: Path, meta: dict[str, Any]) -> SigmaMoEConfig:
    """The model config `meta.json` records (EP=1: every expert in one model)."""
    rec = dict(meta.get("model_config") or {})
    if "router_topk" not in rec:
        raise ValueError(
            f"{ckpt / 'meta.json'} records only the model's shapes (written before full model "
            "configs were saved, before 2026-12-01): this version cannot load it for inference "
            "(resuming training from it still works)"
        )
    unknown = sorted(set(rec) - {f.name for f in dataclasses.fields(SigmaMoEConfig)})
    if unknown:
        raise ValueError(
            f"{ckpt / 'meta.json'}: model_config fields {unknown} are unknown to this version of "
            "SigmaMoEConfig (saved by a newer sigma-moe?)"
        )
    rec["ep_size"] = 1
    return SigmaMoEConfig(**rec)


def read_model_checkpoint(
    path: str | Path,
) -> tuple[SigmaMoEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(model config with ep_size 1, full state dict, meta.json) of the checkpoint at `path`: a
    checkpoint folder, or a run / `checkpoints/` folder (its newest undamaged checkpoint). The
    manifest is checked first (`resolve_checkpoint`): a damaged checkpoint is never read."""
    return read_checked_checkpoint(resolve_checkpoint(path))


def read_checked_checkpoint(
    ckpt: Path,
) -> tuple[SigmaMoEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """`read_model_checkpoint` of a folder that `resolve_checkpoint` returned: its manifest was
    checked there and is not hashed again (sha256 of every file: ~1.5 s per GB)."""
    meta = read_meta(ckpt)
    cfg = model_config_of(ckpt, meta)
    try:
        state = load_full_state_dict(ckpt)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"checkpoint {ckpt}: weights are unreadable: {e}") from e
    return cfg, {k.removeprefix("_orig_mod."): v for k, v in state.items()}, meta
