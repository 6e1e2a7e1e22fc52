"""`sigma-moe eval` and `sigma-moe generate` on a checkpoint, without DeepSpeed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sigma_moe.config import apply_overrides, config_from_dict
from sigma_moe.data.batch import block_causal_mask, masked_labels
from sigma_moe.data.dataset import build_val_datasets, collate
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.model.inference import load_model_for_inference
from sigma_moe.train.collectives import all_reduce_


@torch.no_grad()
def domain_val_losses(
    model, val_ds: dict, batch_size: int, rank: int = 0, dp: int = 1, device=None
) -> dict[str, float]:
    """Per-domain validation CE (summed over each domain's counted tokens, then divided) of
    ``model`` (a SigmaMoEForCausalLM or the DeepSpeed engine around one) over each held-out
    split. With ``dp`` ranks each evaluates its share and the sums are all-reduced, so every rank
    returns the same numbers."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, ds in val_ds.items():
        n = len(ds)
        tot = torch.zeros(2, dtype=torch.float64)
        # Every rank runs the same number of forwards (EP all-to-alls must pair up); a rank past
        # the end repeats sample 0 and counts nothing.
        per_rank = -(-n // dp)
        idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        for i in range(0, per_rank, batch_size):
            chunk = idx[i : i + batch_size] or [0]
            b = collate([ds[j] for j in chunk])
            b = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
            res = model(
                b["input_ids"],
                labels=masked_labels(b),
                attn_mask_BSS=block_causal_mask(b.get("doc_ids")),
                return_logits=False,
            )
            real = float(bool(idx[i : i + batch_size]))
            tot += real * torch.tensor(
                [float(res.loss_per_token.sum()), float((b["loss_mask"] > 0).sum())],
                dtype=torch.float64,
            )
        if dp > 1:
            all_reduce_(tot)
        out[name] = float(tot[0] / max(float(tot[1]), 1.0))
    model.train(was_training)
    return out


def eval_metrics(val_loss: dict[str, float], clean: list[str]) -> dict[str, float]:
    """The logged eval line: ``val_loss/<domain>``, ``clean_val_loss`` (mean over the clean
    domains, when there are any), ``val_loss`` (mean over domains) and ``val_loss_worst``."""
    out = {f"val_loss/{name}": v for name, v in val_loss.items()}
    present = [c for c in clean if c in val_loss]
    if present:
        out["clean_val_loss"] = float(np.mean([val_loss[c] for c in present]))
    out["val_loss"] = float(np.mean(list(val_loss.values())))
    out["val_loss_worst"] = float(np.max(list(val_loss.values())))
    return out


def evaluate_model(model, val_ds: dict, clean: list[str], batch_size: int = 8) -> dict:
    """One process: ``{"val_loss": {domain: loss}, "clean_val_loss": float | None}`` (what
    ``sigma-moe eval --json`` writes)."""
    val_loss = domain_val_losses(model, val_ds, batch_size)
    return {
        "val_loss": val_loss,
        "clean_val_loss": eval_metrics(val_loss, clean).get("clean_val_loss"),
    }


def evaluate_checkpoint(ckpt: str | Path, json_path: str | None = None, set_overrides=None) -> dict:

    model, cfg_dict, _ = load_model_for_inference(ckpt)
    cfg = config_from_dict(apply_overrides(cfg_dict, set_overrides or []))
    tok = load_tokenizer(cfg.data.tokenizer)
    val = build_val_datasets(
        cfg.data.domains,
        cfg.data.seq_len,
        tok,
        max_samples_per_domain=cfg.data.val_samples_per_domain,
    )
    # the run's micro-batch: the same forwards as the loop's eval, so the same numbers (bitwise)
    clean = [d.name for d in cfg.data.domains if d.clean]
    res = evaluate_model(model, val, clean, batch_size=cfg.train.micro_batch_size)
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
        # temperature 0 = greedy: logits / 1e-5 make the softmax one-hot on the argmax (unless
        # two logits are within ~1e-3)
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
