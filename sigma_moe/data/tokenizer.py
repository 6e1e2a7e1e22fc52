"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with ``<|endoftext|>`` as EOD.

``Tokenizer`` is also the tokenizer object megatron-core's ``GPTDatasetConfig`` wants: it has
``eod``, ``vocab_size`` and ``unique_identifiers`` (which enters megatron's index-cache hash).

``fingerprint`` is a sha256 of the canonical JSON of ``tokenizer.json`` (formatting-independent):
prepared datasets record it in ``<prefix>.meta.json`` and reference models record it too, so a
mismatched tokenizer is refused instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sigma_moe.fs import write_atomic

EOD_TOKEN = "<|endoftext|>"
BUNDLED_TOKENIZER_PATH = Path(__file__).resolve().parent / "bundled" / "tokenizer.json"
BUNDLED_VOCAB_SIZE = 8192


def _canonical_fingerprint(raw: str) -> str:
    obj = json.loads(raw)
    canon = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(path_or_json: str | os.PathLike) -> str:
    """The ``fingerprint`` of a ``tokenizer.json`` (a path, or its JSON text) without loading it."""
    s = str(path_or_json)
    if not s.lstrip().startswith("{"):
        p = Path(s)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
        try:
            s = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"tokenizer file {str(p)!r} is not UTF-8 text (a binary file?)"
            ) from None
    try:
        return _canonical_fingerprint(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a valid tokenizer.json ({e.msg})") from None


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"tokenizer file {str(p)!r} is not a tokenizer.json (not UTF-8 text; a binary "
                "file?)"
            ) from None
        try:
            self._tok = HFTokenizer.from_str(raw)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"tokenizer file {str(p)!r} is not a valid tokenizer.json: {e}") from e
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"tokenizer {str(p)!r} has no {EOD_TOKEN} token (needed as EOD)")
        self.path = str(p.resolve())
        self.eod: int = int(eod)
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.fingerprint: str = _canonical_fingerprint(raw)
        self.unique_identifiers: dict = {
            "class": "sigma_moe.data.tokenizer.Tokenizer",
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "fingerprint": self.fingerprint,
        }

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
            f"fingerprint={self.fingerprint[:12]}…)"
        )


def load_tokenizer(spec: str | os.PathLike | Tokenizer = "bundled") -> Tokenizer:
    """``"bundled"`` (the committed 8192-token BPE) or a path to a ``tokenizer.json``.

    A directory is accepted if it holds ``tokenizer.json`` (e.g. a transformers model folder).
    """
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or str(spec) == "bundled":
        if not BUNDLED_TOKENIZER_PATH.is_file():
            raise FileNotFoundError(
                f"bundled tokenizer {str(BUNDLED_TOKENIZER_PATH)!r} is missing (broken install?)"
            )
        return Tokenizer(BUNDLED_TOKENIZER_PATH)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {str(p)!r} holds no tokenizer.json")
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(
            f"tokenizer {str(p)!r} does not exist (use 'bundled' or a path to a tokenizer.json)"
        )
    return Tokenizer(p)


def _train(docs: Iterator[str], vocab_size: int, out_path: str | os.PathLike) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + EOD + merges), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, tok.to_str(pretty=False))
    return out


def train_tokenizer(
    files: list[str | os.PathLike] | str | os.PathLike,
    vocab_size: int = BUNDLED_VOCAB_SIZE,
    out_path: str | os.PathLike = "tokenizer.json",
) -> Tokenizer:
    """Train a byte-level BPE on documents of ``files`` (.txt/.jsonl or folders); save it."""
    from sigma_moe.data.textio import iter_documents, resolve_inputs

    resolve_inputs(files)  # fail early, naming a missing file
    out = _train(iter_documents(files), vocab_size, out_path)
    return Tokenizer(out)


def train_bundled_tokenizer(out_path: str | os.PathLike = BUNDLED_TOKENIZER_PATH) -> Tokenizer:
    """Maintainer helper: retrain the committed tokenizer on the bundled corpus (all domains)."""
    from sigma_moe.data.corpus import DEFAULT_SEED, corpus_docs

    docs = corpus_docs(DEFAULT_SEED)
    out = _train((d for name in sorted(docs) for d in docs[name]), BUNDLED_VOCAB_SIZE, out_path)
    return Tokenizer(out)
