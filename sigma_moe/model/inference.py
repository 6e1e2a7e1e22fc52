"""Loading a trained model for inference (`sigma-moe eval`, `generate`, the Rho-1 reference, the
experiments): the model through the one checkpoint reader (`read_checked_checkpoint`, after
`resolve_checkpoint` checked the manifest once), plus the run config it was trained with
(config.yaml: tokenizer, data) and its meta.json. No DeepSpeed, no trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from sigma_moe.model.checkpoint_format import resolve_checkpoint
from sigma_moe.model.checkpoint_io import read_checked_checkpoint
from sigma_moe.model.lm import SigmaMoEForCausalLM


def load_model_for_inference(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SigmaMoEForCausalLM, dict[str, Any], dict[str, Any]]:
    """(model: every expert, EP=1, fp32, eval mode, top-k as at the saved step, on `device`;
    the run config as a dict; meta.json) of the checkpoint at `path` (a checkpoint folder, or a
    run / `checkpoints/` folder: its newest undamaged checkpoint)."""
    return load_checked_for_inference(resolve_checkpoint(path), device)


def load_checked_for_inference(
    ckpt: Path, device: str | torch.device = "cpu"
) -> tuple[SigmaMoEForCausalLM, dict[str, Any], dict[str, Any]]:
    """`load_model_for_inference` of a checkpoint folder that `resolve_checkpoint` returned (the
    caller checked its manifest; the files are not hashed again: ~1.5 s per GB)."""
    config, state, meta = read_checked_checkpoint(ckpt)
    model = SigmaMoEForCausalLM.from_state_dict(config, state, ckpt)
    try:
        run_config = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"checkpoint {ckpt}: config.yaml is unreadable: {e}") from e
    return model.to(device), run_config, meta
