"""The frozen Rho-1 reference model: loading (ours or a transformers folder) and scoring.

``load_reference(path, tokenizer)`` accepts

(a) a checkpoint of ours — a run's ``checkpoints/`` folder, a run folder or one checkpoint
    folder (``sigma_moe.model.inference``, its manifest checked once); its
    ``meta["tokenizer_fingerprint"]`` must equal the training tokenizer's;
(b) a transformers model folder (``config.json`` + weights), loaded offline with
    ``AutoModelForCausalLM.from_pretrained``. Its ``tokenizer.json`` must have the training
    tokenizer's fingerprint; a folder without ``tokenizer.json`` is accepted only if the model's
    vocab size equals the tokenizer's.

A mismatch raises ``ValueError`` naming both fingerprints (or vocab sizes) and the path: scores
from a reference that reads different token ids are garbage, never a soft warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sigma_moe.data.tokenizer import _canonical_fingerprint, load_tokenizer
from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.model.checkpoint_format import resolve_checkpoint
from sigma_moe.model.inference import load_checked_for_inference
from sigma_moe.rho1.store import fingerprint_with_dtype

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ReferenceModel:
    model: torch.nn.Module
    kind: str  # "sigma-moe" | "transformers"
    path: str
    fingerprint: str  # identifies the weights (the store records it)
    tokenizer_fingerprint: str | None
    vocab_size: int
    num_params: int

    @torch.no_grad()
    def score(
        self,
        input_ids_BS: torch.Tensor,
        labels_BS: torch.Tensor,
        attn_mask_BSS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return score_batch(self.model, input_ids_BS, labels_BS, attn_mask_BSS)


def _weights_fingerprint(folder: Path, text_files: list[Path]) -> str:
    """Cheap identity of a model folder: its config/meta text and, per weight file, the name,
    size and first/last MiB (changes when the weights change; independent of where the folder
    lives; reads ≤ 2 MiB per file even for a large reference)."""
    h = hashlib.sha256()
    for f in text_files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def _tokenizer_fp(tokenizer: Any) -> tuple[str | None, int]:
    tok = load_tokenizer(tokenizer)
    return tok.fingerprint, tok.vocab_size


def is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and not (p / "meta.json").is_file()


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def reference_dtype(cfg) -> str:
    """``rho1.reference_dtype`` resolved: ``auto`` follows ``train.precision``."""
    d = cfg.rho1.reference_dtype
    return cfg.train.precision if d == "auto" else d


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"rho1.reference_dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _with_dtype(fingerprint: str, dtype: str) -> str:
    _torch_dtype(dtype)  # a bad value is an error here too
    return fingerprint_with_dtype(fingerprint, dtype)


def load_reference(
    path: str | os.PathLike,
    tokenizer: Any = "bundled",
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
) -> ReferenceModel:
    """Load the frozen reference (eval mode, no grads) and check its tokenizer against ours.

    ``tokenizer``: a ``sigma_moe.data.tokenizer.Tokenizer`` or a spec (``"bundled"``, a path).
    ``dtype``: ``rho1.reference_dtype`` ("fp32" or "bf16"); the losses are returned in fp32.
    """
    torch_dtype = _torch_dtype(dtype)  # a bad value fails before any loading
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"rho1.reference {str(p)!r} does not exist (expected a checkpoint folder of ours or a "
            "transformers model folder)"
        )
    tok_fp, tok_vocab = _tokenizer_fp(tokenizer)
    if is_hf_folder(p):
        ref = _load_hf(p, tok_fp, tok_vocab, device, torch_dtype)
    else:
        ref = _load_ours(p, tok_fp, device)
    ref.model.eval()
    for prm in ref.model.parameters():
        prm.requires_grad_(False)
    if torch_dtype != torch.float32:
        # Ours: every buffer it computes with is rebuilt in fp32 per call (the RoPE tables).
        # transformers' models are loaded in the dtype (from_pretrained keeps their fp32
        # buffers, e.g. RoPE's inv_freq, which a blanket .to() would round).
        if ref.kind == "sigma-moe":
            ref.model.to(torch_dtype)
        ref.fingerprint = _with_dtype(ref.fingerprint, dtype)
    return ref


def _checked_checkpoint(p: Path, tok_fp: str) -> tuple[Path, str]:
    """Our checkpoint folder behind `p` and its tokenizer fingerprint, which must be `tok_fp`."""
    try:
        ckpt = resolve_checkpoint(p)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"rho1.reference {str(p)!r} is neither a checkpoint of ours nor a transformers model "
            f"folder (no config.json): {e}"
        ) from e
    ref_tok = json.loads((ckpt / "meta.json").read_text()).get("tokenizer_fingerprint")
    if ref_tok != tok_fp:
        raise ValueError(
            f"rho1.reference {str(ckpt)!r} was trained with tokenizer fingerprint {ref_tok!r}, "
            f"but this run's tokenizer has fingerprint {tok_fp!r}: the reference must use the "
            "same tokenizer"
        )
    return ckpt, ref_tok


def _load_ours(p: Path, tok_fp: str, device) -> ReferenceModel:
    # Check the tokenizer before building the model: cheap and the clearer error.
    ckpt, ref_tok = _checked_checkpoint(p, tok_fp)
    model, _cfg, meta = load_checked_for_inference(ckpt, device=device)  # resolved above
    fp = _weights_fingerprint(ckpt, [ckpt / "meta.json", ckpt / "config.yaml"])
    return ReferenceModel(
        model=model,
        kind="sigma-moe",
        path=str(ckpt),
        fingerprint=f"sigma-moe:{fp}",
        tokenizer_fingerprint=ref_tok,
        vocab_size=int(model.config.vocab_size),
        num_params=sum(x.numel() for x in model.parameters()),
    )


def _load_hf(
    p: Path, tok_fp: str, tok_vocab: int, device, dtype: torch.dtype = torch.float32
) -> ReferenceModel:
    # transformers loads in ~3 s: only when the reference is one of its folders.
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(p, local_files_only=True)
    vocab = int(getattr(hf_cfg, "vocab_size", 0) or 0)
    ref_tok_fp = None
    if (p / "tokenizer.json").is_file():
        ref_tok_fp = _canonical_fingerprint((p / "tokenizer.json").read_text(encoding="utf-8"))
        if ref_tok_fp != tok_fp:
            raise ValueError(
                f"rho1.reference {str(p)!r}: its tokenizer.json has fingerprint {ref_tok_fp!r}, "
                f"but this run's tokenizer has fingerprint {tok_fp!r}: the reference must use the "
                "same tokenizer"
            )
        if vocab < tok_vocab:
            raise ValueError(
                f"rho1.reference {str(p)!r}: model vocab size {vocab} is smaller than the "
                f"tokenizer's {tok_vocab}"
            )
    elif vocab != tok_vocab:
        raise ValueError(
            f"rho1.reference {str(p)!r} has no tokenizer.json and its vocab size {vocab} differs "
            f"from this run's tokenizer vocab size {tok_vocab}: the reference must use the same "
            "tokenizer"
        )
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype).to(device)
    fp = _weights_fingerprint(p, [p / "config.json"])
    return ReferenceModel(
        model=model,
        kind="transformers",
        path=str(p),
        fingerprint=f"transformers:{fp}",
        tokenizer_fingerprint=ref_tok_fp,
        vocab_size=vocab,
        num_params=sum(x.numel() for x in model.parameters()),
    )


def check_reference_tokenizer(path: str | os.PathLike, tokenizer: Any = "bundled") -> None:
    """The tokenizer checks of ``load_reference`` without loading the model (cheap; the trainer
    runs it before spawning the scorer so a mismatch fails at once)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"rho1.reference {str(p)!r} does not exist")
    tok_fp, tok_vocab = _tokenizer_fp(tokenizer)
    if is_hf_folder(p):
        if (p / "tokenizer.json").is_file():
            fp = _canonical_fingerprint((p / "tokenizer.json").read_text(encoding="utf-8"))
            if fp != tok_fp:
                raise ValueError(
                    f"rho1.reference {str(p)!r}: its tokenizer.json has fingerprint {fp!r}, but "
                    f"this run's tokenizer has fingerprint {tok_fp!r}: the reference must use the "
                    "same tokenizer"
                )
        else:
            vocab = int(json.loads((p / "config.json").read_text()).get("vocab_size", 0) or 0)
            if vocab != tok_vocab:
                raise ValueError(
                    f"rho1.reference {str(p)!r} has no tokenizer.json and its vocab size {vocab} "
                    f"differs from this run's tokenizer vocab size {tok_vocab}: the reference "
                    "must use the same tokenizer"
                )
        return
    _checked_checkpoint(p, tok_fp)


def reference_fingerprint(path: str | os.PathLike, dtype: str = "fp32") -> str:
    """The fingerprint ``load_reference(path, dtype=dtype).fingerprint`` has, without loading
    the model."""
    p = Path(path).expanduser()
    if is_hf_folder(p):
        return _with_dtype(f"transformers:{_weights_fingerprint(p, [p / 'config.json'])}", dtype)
    ckpt = resolve_checkpoint(p)
    fp = _weights_fingerprint(ckpt, [ckpt / "meta.json", ckpt / "config.yaml"])
    return _with_dtype(f"sigma-moe:{fp}", dtype)


@torch.no_grad()
def score_batch(
    model: torch.nn.Module | ReferenceModel,
    input_ids_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    attn_mask_BSS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token reference CE, float32 [B, S]; 0 where ``labels == -100``. No grad, eval mode.

    ``labels`` are the next-token targets aligned with ``input_ids`` (our datasets' convention).
    ``attn_mask_BSS`` (bool, True = attend; data.reset_at_eod) is honoured by our models.
    """
    if isinstance(model, ReferenceModel):
        model = model.model
    if model.training:
        model.eval()
    dev = next(model.parameters()).device
    ids = input_ids_BS.to(dev)
    labels = labels_BS.to(dev)
    base = getattr(model, "_orig_mod", model)
    if isinstance(base, SigmaMoEForCausalLM):
        out = model(
            ids,
            labels=labels,
            attn_mask_BSS=None if attn_mask_BSS is None else attn_mask_BSS.to(dev),
            return_logits=False,
        )
        ce = out.loss_per_token
    else:
        logits = model(input_ids=ids).logits
        B, S, V = logits.shape
        ce = F.cross_entropy(
            logits.float().reshape(B * S, V),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(B, S)
    return ce.float().masked_fill(labels == -100, 0.0).cpu()
