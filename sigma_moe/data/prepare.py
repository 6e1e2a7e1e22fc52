"""``sigma-moe prepare-data`` / ``train-tokenizer``: text -> megatron-core indexed datasets.

``prepare_data`` writes, for a domain NAME into DIR:

- ``DIR/NAME.bin`` + ``DIR/NAME.idx``          training documents (megatron ``IndexedDataset``)
- ``DIR/NAME-val.bin`` + ``DIR/NAME-val.idx``  validation documents (document-level split)
- ``DIR/NAME.meta.json`` and ``DIR/NAME-val.meta.json``: tokenizer fingerprint, counts, …

Every document ends with the tokenizer's EOD id. Ids are stored as uint16 when the vocabulary
is smaller than 65,536 (int32 otherwise). The split is deterministic: a seeded permutation of
the document indices picks ``round(n * val_fraction)`` (at least 1 when ``val_fraction > 0`` and
there are >= 2 documents) validation documents; both splits keep the input order.

Files are written under temporary names and renamed into place, and megatron's index cache
(``DIR/NAME/cache``), which is keyed by path and not by content, is removed so a re-prepared
dataset never reuses stale sample indices.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from sigma_moe.data.textio import check_output_folder, iter_documents, resolve_inputs
from sigma_moe.data.tokenizer import BUNDLED_VOCAB_SIZE, Tokenizer, load_tokenizer
from sigma_moe.fs import write_atomic

META_FORMAT = "sigma-moe-prepared/1"
_SCAN_LIMIT_BYTES = 256 << 20  # check token ids of .bin files up to this size
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ENCODE_BATCH = 512


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.meta.json")


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.int32


_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
# megatron.core.datasets.indexed_dataset.DType
_CODE_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}  # fmt: skip


def _write_indexed(prefix: Path, docs_ids: list[np.ndarray], dtype) -> None:
    """Write ``prefix.bin/.idx`` in megatron-core's ``IndexedDataset`` format (version 1, one
    sequence per document), atomically: temporary names, then rename.

    Written directly (same bytes as ``IndexedDatasetBuilder``) so preparing data does not pay
    for importing megatron-core; the tests read the result back with megatron's reader.
    """
    dt = np.dtype(dtype)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    lengths = np.array([len(a) for a in docs_ids], dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dt.itemsize
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(f"{tmp}.bin", "wb") as f:
        for a in docs_ids:
            f.write(np.ascontiguousarray(a, dtype=dt).tobytes())
    with open(f"{tmp}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _DTYPE_CODES[dt]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    shutil.rmtree(prefix / "cache", ignore_errors=True)  # stale megatron sample indices


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _split_docs(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (length n): True for validation documents."""
    is_val = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 2:
        return is_val
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    perm = np.random.RandomState(seed).permutation(n)
    is_val[perm[:n_val]] = True
    return is_val


def _tokenize_docs(docs, tokenizer: Tokenizer, dtype) -> list[np.ndarray]:
    """Token ids of each non-empty document followed by EOD, encoded ``_ENCODE_BATCH`` at a time."""
    all_ids: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(batch):
            if ids:
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = tokenizer.eod
                all_ids.append(arr)
        batch.clear()

    for d in docs:
        batch.append(d)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    return all_ids


def _num_tokens(docs_ids: list[np.ndarray]) -> int:
    return int(sum(len(a) for a in docs_ids))


def _write_splits(
    out: Path, domain: str, train_docs: list, val_docs: list, dtype, base_meta: dict
) -> tuple[str, str | None]:
    """Write the train split (and the val split, or remove a stale one) with their meta files."""
    train_prefix = out / domain
    _write_indexed(train_prefix, train_docs, dtype)
    _write_json(
        meta_path(train_prefix),
        {
            **base_meta,
            "split": "train",
            "num_docs": len(train_docs),
            "num_tokens": _num_tokens(train_docs),
            "val_num_docs": len(val_docs),
            "val_num_tokens": _num_tokens(val_docs),
        },
    )
    val_prefix = out / f"{domain}-val"
    if val_docs:
        _write_indexed(val_prefix, val_docs, dtype)
        _write_json(
            meta_path(val_prefix),
            {
                **base_meta,
                "split": "val",
                "num_docs": len(val_docs),
                "num_tokens": _num_tokens(val_docs),
            },
        )
        return str(train_prefix), str(val_prefix)
    for suffix in (".bin", ".idx", ".meta.json"):  # no stale split from an earlier run
        Path(f"{val_prefix}{suffix}").unlink(missing_ok=True)
    return str(train_prefix), None


def prepare_docs(
    docs,
    domain: str,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    val_fraction: float = 0.05,
    seed: int = 1234,
    extra_meta: dict | None = None,
) -> tuple[str, str | None]:
    """Like ``prepare_data`` but from an iterable of document strings."""
    if not _DOMAIN_RE.match(domain or ""):
        raise ValueError(
            f"domain {domain!r}: use letters, digits, '_', '-', '.' (it names the output files)"
        )
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = check_output_folder(out_dir, "--out")
    out.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    all_ids = _tokenize_docs(docs, tokenizer, dtype)
    if not all_ids:
        raise ValueError(f"domain {domain!r}: the inputs hold no non-empty document")

    is_val = _split_docs(len(all_ids), val_fraction, seed)
    train_docs = [a for a, v in zip(all_ids, is_val) if not v]
    val_docs = [a for a, v in zip(all_ids, is_val) if v]
    base_meta = {
        "format": META_FORMAT,
        "domain": domain,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_path": tokenizer.path,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "dtype": np.dtype(dtype).name,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        **(extra_meta or {}),
    }
    return _write_splits(out, domain, train_docs, val_docs, dtype, base_meta)


def prepare_data(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    domain: str,
    out_dir: str | os.PathLike,
    tokenizer_spec: str | os.PathLike | Tokenizer = "bundled",
    val_fraction: float = 0.05,
    seed: int = 1234,
) -> tuple[str, str | None]:
    """Tokenise documents of ``inputs`` into ``out_dir/<domain>`` and ``out_dir/<domain>-val``.

    Returns ``(train_prefix, val_prefix)``; ``val_prefix`` is None when no validation document
    was set aside (``val_fraction == 0`` or a single document).
    Raises FileNotFoundError naming a missing input or tokenizer.
    """
    files = resolve_inputs(inputs)
    check_output_folder(out_dir, "--out")  # before the (long) tokenisation
    tokenizer = load_tokenizer(tokenizer_spec)
    return prepare_docs(
        iter_documents(files),
        domain,
        out_dir,
        tokenizer,
        val_fraction=val_fraction,
        seed=seed,
        extra_meta={"inputs": [str(f) for f in files]},
    )


# --------------------------------------------------------------------------- validation


def read_index_header(idx_path: str | os.PathLike) -> dict:
    """Parse a megatron ``.idx`` header and check the file is long enough; no mmap."""
    p = Path(idx_path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
            raise ValueError(f"{p} is not a megatron index file (bad header or truncated)")
        version = struct.unpack("<Q", head[9:17])[0]
        code = head[17]
        seq_count, doc_count = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in _CODE_DTYPES:
            raise ValueError(f"{p}: unsupported index version {version} or dtype code {code}")
        itemsize = np.dtype(_CODE_DTYPES[code]).itemsize
        need = 34 + seq_count * (4 + 8) + doc_count * 8
        if size < need:
            raise ValueError(
                f"{p} is truncated: {size} bytes but its header needs at least {need} "
                f"({seq_count} sequences, {doc_count} document indices)"
            )
        if seq_count == 0:
            return {"sequences": 0, "documents": 0, "itemsize": itemsize, "dtype_code": code,
                    "num_tokens": 0}  # fmt: skip
        lengths = np.fromfile(f, dtype=np.int32, count=seq_count)
        pointers = np.fromfile(f, dtype=np.int64, count=seq_count)
        doc_idx = np.fromfile(f, dtype=np.int64, count=doc_count)
    if doc_count < 1 or doc_idx[-1] != seq_count or (lengths < 0).any():
        raise ValueError(f"{p} is corrupt: inconsistent document indices")
    bin_bytes = int(pointers[-1]) + int(lengths[-1]) * itemsize
    return {
        "sequences": int(seq_count),
        "documents": int(doc_count - 1),
        "itemsize": itemsize,
        "dtype_code": code,
        "num_tokens": int(lengths.sum()),
        "bin_bytes": bin_bytes,
    }


def check_prefix(prefix: str | os.PathLike, tokenizer: Tokenizer | None = None) -> dict:
    """Validate a prepared prefix before megatron touches it (it may crash on bad files).

    FileNotFoundError (missing .bin/.idx, suggesting ``sigma-moe prepare-data``); ValueError
    naming the file for truncated/corrupt files, empty datasets, token ids out of the tokenizer's
    range, or a tokenizer fingerprint that differs from the one in ``<prefix>.meta.json``.
    Returns the parsed header info (plus ``meta`` when a meta file exists).
    """
    prefix = str(prefix)
    bin_p, idx_p = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    missing = [str(p) for p in (bin_p, idx_p) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset prefix {prefix!r}: missing {', '.join(missing)}; create it with "
            f"`sigma-moe prepare-data --input FILE_OR_DIR --domain NAME --out DIR`"
        )
    info = read_index_header(idx_p)
    if info["num_tokens"] == 0:
        raise ValueError(f"dataset {idx_p} holds no tokens")
    bin_size = bin_p.stat().st_size
    if bin_size < info["bin_bytes"]:
        raise ValueError(
            f"{bin_p} is truncated: {bin_size} bytes, but {idx_p} says {info['bin_bytes']}"
        )
    mp = meta_path(prefix)
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mp} is not valid JSON: {e}") from None
        info["meta"] = meta
        if tokenizer is not None and meta.get("tokenizer_fingerprint") not in (
            None,
            tokenizer.fingerprint,
        ):
            raise ValueError(
                f"dataset {prefix!r} was tokenised with tokenizer {meta.get('tokenizer_path')!r} "
                f"(fingerprint {meta['tokenizer_fingerprint'][:16]}…) but the configured tokenizer "
                f"is {tokenizer.path!r} (fingerprint {tokenizer.fingerprint[:16]}…); re-run "
                f"`sigma-moe prepare-data` with --tokenizer {tokenizer.path}"
            )
    if tokenizer is not None and info["bin_bytes"] <= _SCAN_LIMIT_BYTES:
        # cheap for small data (1M tokens: ~1 ms); catches a dataset prepared with a larger
        # vocabulary when no meta file says so
        dtype = _CODE_DTYPES[info["dtype_code"]]
        ids = np.memmap(
            bin_p, dtype=dtype, mode="r", shape=(info["bin_bytes"] // info["itemsize"],)
        )
        lo, hi = int(ids.min()), int(ids.max())
        del ids
        if lo < 0 or hi >= tokenizer.vocab_size:
            raise ValueError(
                f"{bin_p} holds token ids in [{lo}, {hi}], outside the vocabulary of the "
                f"configured tokenizer {tokenizer.path!r} (size {tokenizer.vocab_size})"
            )
    return info


# --------------------------------------------------------------------------- CLI


def build_prepare_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="sigma-moe prepare-data",
        description="Tokenise text (.txt with blank-line separated documents, or .jsonl with a "
        "'text' field; folders are searched) into a megatron indexed dataset DIR/NAME and its "
        "validation split DIR/NAME-val.",
    )
    p.add_argument("--input", action="append", required=True, metavar="FILE_OR_DIR",
                   help="input file or folder (repeatable)")  # fmt: skip
    p.add_argument("--domain", required=True, metavar="NAME", help="domain name (output prefix)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--tokenizer", default="bundled", metavar="PATH",
                   help="tokenizer.json path, or 'bundled' (default)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="fraction of documents held out for validation (default 0.05)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/val split")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_prepare_parser().parse_args(argv)
    try:
        train, val = prepare_data(
            args.input, args.domain, args.out, args.tokenizer, args.val_fraction, args.seed
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"sigma-moe prepare-data: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(meta_path(train).read_text())
    print(
        f"wrote {train} ({meta['num_docs']} docs, {meta['num_tokens']} tokens)"
        + (
            f" and {val} ({meta['val_num_docs']} docs, {meta['val_num_tokens']} tokens)"
            if val
            else ""
        )
    )
    return 0


def build_train_tokenizer_parser(
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="sigma-moe train-tokenizer",
        description="Train a byte-level BPE tokenizer (EOD token <|endoftext|>) on text files.",
    )
    p.add_argument("--input", action="append", required=True, metavar="FILE_OR_DIR",
                   help="input file or folder (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="PATH", help="output tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=BUNDLED_VOCAB_SIZE, metavar="N",
                   help=f"vocabulary size (default {BUNDLED_VOCAB_SIZE})")  # fmt: skip
    return p


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    from sigma_moe.data.tokenizer import train_tokenizer

    args = build_train_tokenizer_parser().parse_args(argv)
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"sigma-moe train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
