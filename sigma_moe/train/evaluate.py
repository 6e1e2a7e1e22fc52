"""`sigma-moe eval` and `sigma-moe generate` on a checkpoint, without DeepSpeed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sigma_moe.config import config_from_dict, parse_overrides
from sigma_moe.data.dataset import build_val_datasets, collate
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.train.checkpoint import load_model_for_inference


@torch.no_grad()
def evaluate_model(model, val_ds: dict, clean: list[str], batch_size: int = 8) -> dict:

    model.eval()
    res: dict = {"val_loss": {}}
    for name, ds in val_ds.items():
        tot, n = 0.0, 0.0
        for i in range(0, len(ds), batch_size):
            b = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            labels = b["labels"].masked_fill(b["loss_mask"] <= 0, -100)
            out = model(b["input_ids"], labels=labels, return_logits=False)
            tot += float(out.loss_per_token.sum())
            n += float((labels != -100).sum())
        res["val_loss"][name] = tot / max(n, 1.0)
    present = [c for c in clean if c in res["val_loss"]]
    res["clean_val_loss"] = (
        float(np.mean([res["val_loss"][c] for c in present])) if present else None
    )
    return res


def evaluate_checkpoint(ckpt: str | Path, json_path: str | None = None, set_overrides=None) -> dict:

    model, cfg_dict, _ = load_model_for_inference(ckpt)
    for k, v in parse_overrides(set_overrides or []):
        node = cfg_dict
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    cfg = config_from_dict(cfg_dict)
    tok = load_tokenizer(cfg.data.tokenizer)
    val = build_val_datasets(
        cfg.data.domains,
        cfg.data.seq_len,
        tok,
        max_samples_per_domain=cfg.data.val_samples_per_domain,
    )
    res = evaluate_model(model, val, [d.name for d in cfg.data.domains if d.clean])
    for name, v in res["val_loss"].items():
        print(f"val_loss/{name:<12} {v:.4f}")
    if res["clean_val_loss"] is not None:
        print(f"clean_val_loss        {res['clean_val_loss']:.4f}")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))
    return res


# No KV cache: every new token is one forward over up to max_seq_len tokens, so a million
# tokens would run for hours on CPU with nothing to show; 4096 is ~3 min for demo-cpu here.
MAX_NEW_TOKENS = 4096


def check_generate_args(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """Refuse what would crash deep in torch or silently do something else (issue 15)."""
    if not prompt:
        raise ValueError("--prompt is empty: give some text for the model to continue")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )


def stream_text(
    ckpt: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, seed: int = 0
) -> Iterator[str]:
    """The prompt, then the generated text piece by piece as tokens come (a piece is held back
    while it ends inside a multi-byte character). Stops at EOD or after `max_new_tokens`."""

    check_generate_args(prompt, max_new_tokens, temperature)
    torch.manual_seed(seed)
    model, cfg_dict, _ = load_model_for_inference(ckpt)
    tok = load_tokenizer(config_from_dict(cfg_dict).data.tokenizer)
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    emitted = tok.decode(ids[0].tolist())
    yield emitted
    for _ in range(max_new_tokens):
        ids = model.generate(ids, 1, temperature=max(temperature, 1e-5), eod=tok.eod)
        text = tok.decode(ids[0].tolist())
        if text.startswith(emitted) and not text.endswith("\ufffd"):
            yield text[len(emitted) :]
            emitted = text
        if int(ids[0, -1]) == tok.eod:
            break
    text = tok.decode(ids[0].tolist())
    if text != emitted:
        yield text[len(emitted) :] if text.startswith(emitted) else "\n" + text


def generate_text(
    ckpt: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, seed: int = 0
) -> str:
    return "".join(stream_text(ckpt, prompt, max_new_tokens, temperature, seed))
