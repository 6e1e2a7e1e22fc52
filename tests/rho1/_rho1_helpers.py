"""Tiny reference models for the Rho-1 tests (no downloads, no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml


def make_hf_reference(folder: Path, tokenizer_json: Path | None = None, seed: int = 0) -> Path:
    """A randomly initialised tiny transformers Qwen3 with our tokenizer files."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from sigma_moe.data.tokenizer import BUNDLED_TOKENIZER_PATH, load_tokenizer

    tok = load_tokenizer("bundled")
    cfg = Qwen3Config(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_json or BUNDLED_TOKENIZER_PATH, folder / "tokenizer.json")
    return folder


def make_ours_reference(folder: Path, tokenizer_fingerprint: str | None = None) -> Path:
    """A checkpoint folder of ours (test-tiny preset) in the layout the trainer writes."""
    from sigma_moe.config import RunConfig
    from sigma_moe.data.tokenizer import load_tokenizer
    from sigma_moe.model import SigmaMoEForCausalLM
    from sigma_moe.model.checkpoint_format import build_meta, model_config_record

    cfg = RunConfig()
    cfg.model.preset = "test-tiny"
    cfg.validate()
    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    model = SigmaMoEForCausalLM(cfg.build_model(tok.vocab_size))
    ck = folder / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True, exist_ok=True)
    torch.save({"module": model.state_dict()}, ck / "mp_rank_00_model_states.pt")
    (ck / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    fp = tokenizer_fingerprint or tok.fingerprint
    meta = build_meta(1, 8, fp, 1, 1, {"model_config": model_config_record(model)})
    (ck / "meta.json").write_text(json.dumps(meta))
    (folder / "checkpoints" / "latest").write_text("step_00000001")
    return folder / "checkpoints"
