"""Loading a trained model for inference (`sigma-moe eval`, `generate`, the Rho-1 reference, the
experiments): the model through the one checkpoint reader (`read_model_checkpoint`, via
`SigmaMoEForCausalLM.from_checkpoint`), plus the run config it was trained with (config.yaml:
tokenizer, data) and its meta.json. No DeepSpeed, no trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from sigma_moe.model.checkpoint_format import read_meta, resolve_checkpoint
from sigma_moe.model.lm import SigmaMoEForCausalLM


def load_model_for_inference(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SigmaMoEForCausalLM, dict[str, Any], dict[str, Any]]:
    """(model: every expert, EP=1, fp32, eval mode, top-k as at the saved step, on `device`;
    the run config as a dict; meta.json) of the checkpoint at `path` (a checkpoint folder, or a
    run / `checkpoints/` folder: its newest undamaged checkpoint)."""
    ckpt = resolve_checkpoint(path)
    model = SigmaMoEForCausalLM.from_checkpoint(ckpt)
    try:
        run_config = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"checkpoint {ckpt}: config.yaml is unreadable: {e}") from e
    return model.to(device), run_config, read_meta(ckpt)
