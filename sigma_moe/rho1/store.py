"""Memory-mapped reference-loss store, keyed by (domain, sample index within the domain).

Layout of ``root``::

    meta.json            seq_len, dtype, domains {name: {size, identity}}, tokenizer and
                         reference fingerprints — validated on every reopen
    <domain>.loss        [size, seq_len] float16 (row = per-token reference CE of one sample)
    <domain>.done        [size] uint8 (1 = the row is complete)

Why float16: reference CE values lie in [0, ~20] nats; float16 keeps ~3 significant digits
(absolute error ≤ 0.008 at CE 16, ≤ 0.002 at CE 4), far below the token-to-token spread of the
excess loss the selection ranks on, and halves the disk / page-cache footprint (a 15B-token run
needs 30 GB instead of 60 GB). Rounding is deterministic, so a restarted scorer writes
bit-identical rows. ``dtype="float32"`` is available when that matters.

Concurrency: one writer per store (the scorer), any number of readers (the trainer ranks of
the node). ``put`` writes the row with ``pwrite`` first, then the done flag, in that order, so a
reader that sees the flag sees the complete row (same page cache; the syscalls complete in
order). Readers map the files read-only and re-check the file length when a domain grows.
A writer crash leaves at most one row without its flag — it is simply recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from sigma_moe.fs import write_atomic

META = "meta.json"
FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}


class StoreMetaError(ValueError):
    """The store on disk does not match what the caller expects (seq_len, tokenizer, ...)."""


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


_BF16 = ":bf16"  # a reference fingerprint's suffix when the reference ran in bf16


def fingerprint_with_dtype(fingerprint: str, dtype: str) -> str:
    """A reference's fingerprint as a store records it: its weights' and, for bf16, the dtype
    (a bf16 forward gives other losses than fp32)."""
    return fingerprint + _BF16 if dtype == "bf16" else fingerprint


def fingerprint_dtype(fingerprint: str) -> str:
    """The reference dtype ("fp32" or "bf16") a recorded fingerprint names."""
    return "bf16" if fingerprint.endswith(_BF16) else "fp32"


def _dtype_hint(stored: str, given: str) -> str:
    """Fingerprints of one reference scored in another dtype name the setting."""
    if stored.removesuffix(_BF16) != given.removesuffix(_BF16):
        return ""
    return (
        f" Same reference, other dtype: rho1.reference_dtype={fingerprint_dtype(stored)} "
        "reuses this store."
    )


class RefLossStore:
    """Per-domain memory-mapped arrays of per-token reference losses.

    Args:
        root: store folder (created in mode "w").
        domain_names / domain_sizes: the training dataset's domains and the number of samples of
            each domain's dataset (``TrainDataset.domain_names`` / ``.domain_sizes``). Optional
            in mode "r" (taken from meta.json).
        seq_len: tokens per sample.
        mode: "w" (create or reopen for writing; the scorer) or "r" (read-only; the trainer).
        tokenizer_fingerprint / reference_fingerprint: checked against meta.json when given.
        domain_identities: optional per-domain strings that identify the sample order of the
            domain's dataset (prefix, seed, ...); checked against meta.json when given.
        dtype: "float16" (default) or "float32"; only used when creating.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        domain_names: Sequence[str] | None = None,
        domain_sizes: Sequence[int] | None = None,
        seq_len: int | None = None,
        mode: str = "r",
        tokenizer_fingerprint: str | None = None,
        reference_fingerprint: str | None = None,
        domain_identities: Sequence[str] | None = None,
        dtype: str = "float16",
    ):
        if mode not in ("r", "w"):
            raise ValueError(f"RefLossStore mode must be 'r' or 'w', got {mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"RefLossStore dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.root = Path(root)
        self.mode = mode
        meta_path = self.root / META
        if domain_names is not None and domain_sizes is not None:
            if len(domain_names) != len(domain_sizes):
                raise ValueError(
                    f"{len(domain_names)} domain names but {len(domain_sizes)} domain sizes"
                )
        given = (
            domain_names,
            domain_sizes,
            seq_len,
            tokenizer_fingerprint,
            reference_fingerprint,
            domain_identities,
        )
        if meta_path.is_file():
            meta = self._reopen_meta(*given)
        else:
            meta = self._create_meta(*given, dtype)
        self.meta = meta
        self.seq_len = int(meta["seq_len"])
        self.np_dtype = _DTYPES[meta["dtype"]]
        self.row_bytes = self.seq_len * np.dtype(self.np_dtype).itemsize
        self.domain_names = (
            list(domain_names) if domain_names is not None else list(meta["domains"])
        )
        self.sizes = {n: int(meta["domains"][n]["size"]) for n in self.domain_names}
        self._loss: dict[str, np.memmap] = {}
        self._done: dict[str, np.memmap] = {}
        self._fd_loss: dict[str, int] = {}
        self._fd_done: dict[str, int] = {}
        for n in self.domain_names:
            self._open_domain(n)

    # ------------------------------------------------------------------ meta

    def _reopen_meta(self, names, sizes, seq_len, tok_fp, ref_fp, identities) -> dict:
        """Read and validate an existing meta.json; in mode "w" fill in fingerprints it lacks
        and add domains it does not know yet (rewritten atomically only when something changed)."""
        meta_path = self.root / META
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreMetaError(f"reference-loss store {self.root}: corrupt {META}: {e}") from e
        self._validate(meta, names, sizes, seq_len, tok_fp, ref_fp, identities)
        if self.mode == "w":
            changed = False
            for key, val in (("tokenizer_fingerprint", tok_fp), ("reference_fingerprint", ref_fp)):
                if meta.get(key) is None and val is not None:
                    meta[key] = val
                    changed = True
            for i, name in enumerate(names or []):
                if name not in meta["domains"]:
                    meta["domains"][name] = {
                        "size": int(sizes[i]),
                        "identity": identities[i] if identities else None,
                    }
                    changed = True
            if changed:
                _write_json_atomic(meta_path, meta)
        return meta

    def _create_meta(self, names, sizes, seq_len, tok_fp, ref_fp, identities, dtype) -> dict:
        """Create the store folder and its meta.json (mode "w" only)."""
        if self.mode == "r":
            raise FileNotFoundError(
                f"reference-loss store {self.root} does not exist (no {META}); "
                "fill it with `sigma-moe score` or use rho1.scorer=process|inline"
            )
        if names is None or sizes is None or seq_len is None:
            raise ValueError(
                f"creating reference-loss store {self.root} needs domain_names, "
                "domain_sizes and seq_len"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "seq_len": int(seq_len),
            "dtype": dtype,
            "tokenizer_fingerprint": tok_fp,
            "reference_fingerprint": ref_fp,
            "domains": {
                n: {"size": int(s), "identity": identities[i] if identities else None}
                for i, (n, s) in enumerate(zip(names, sizes))
            },
        }
        _write_json_atomic(self.root / META, meta)
        return meta

    def _err(self, what: str, stored, given) -> StoreMetaError:
        return StoreMetaError(
            f"reference-loss store {self.root}: {what} differs — the store has {stored!r}, "
            f"this run has {given!r}. Use a different rho1.store folder (or delete this one)."
            + (_dtype_hint(str(stored), str(given)) if what == "reference fingerprint" else "")
        )

    def _validate(self, meta, names, sizes, seq_len, tok_fp, ref_fp, identities) -> None:
        if meta.get("format_version") != FORMAT_VERSION:
            raise self._err("format_version", meta.get("format_version"), FORMAT_VERSION)
        if seq_len is not None and int(meta["seq_len"]) != int(seq_len):
            raise self._err("seq_len", meta["seq_len"], int(seq_len))
        for key, val in (("tokenizer_fingerprint", tok_fp), ("reference_fingerprint", ref_fp)):
            if val is not None and meta.get(key) is not None and meta[key] != val:
                raise self._err(key.replace("_", " "), meta[key], val)
        for i, n in enumerate(names or []):
            d = meta["domains"].get(n)
            if d is None:
                if self.mode == "r":
                    raise self._err(
                        f"domain list (no domain {n!r})", sorted(meta["domains"]), list(names)
                    )
                continue
            if sizes is not None and int(d["size"]) != int(sizes[i]):
                raise self._err(f"number of samples of domain {n!r}", d["size"], int(sizes[i]))
            if identities is not None and d.get("identity") not in (None, identities[i]):
                raise self._err(f"dataset identity of domain {n!r}", d["identity"], identities[i])

    # ------------------------------------------------------------------ files

    def _paths(self, name: str) -> tuple[Path, Path]:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad domain name {name!r}")
        return self.root / f"{name}.loss", self.root / f"{name}.done"

    def _open_domain(self, name: str) -> None:
        size = self.sizes[name]
        p_loss, p_done = self._paths(name)
        if self.mode == "w":
            for p, nbytes in ((p_loss, size * self.row_bytes), (p_done, size)):
                fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
                if os.fstat(fd).st_size < nbytes:
                    os.ftruncate(fd, nbytes)  # sparse zero fill; done flags start at 0
                (self._fd_loss if p == p_loss else self._fd_done)[name] = fd
        else:
            for p, nbytes in ((p_loss, size * self.row_bytes), (p_done, size)):
                if not p.is_file() or p.stat().st_size < nbytes:
                    raise StoreMetaError(
                        f"reference-loss store {self.root}: {p.name} is missing or truncated"
                    )
        if size > 0:
            self._loss[name] = np.memmap(
                p_loss, dtype=self.np_dtype, mode="r", shape=(size, self.seq_len)
            )
            self._done[name] = np.memmap(p_done, dtype=np.uint8, mode="r", shape=(size,))

    def close(self) -> None:
        for fd in list(self._fd_loss.values()) + list(self._fd_done.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd_loss.clear()
        self._fd_done.clear()
        self._loss.clear()
        self._done.clear()

    def __enter__(self) -> RefLossStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ access

    def _name(self, domain: str | int) -> str:
        if isinstance(domain, (int, np.integer)) or (
            isinstance(domain, torch.Tensor) and domain.numel() == 1
        ):
            i = int(domain)
            if not 0 <= i < len(self.domain_names):
                raise IndexError(f"domain id {i} out of range ({len(self.domain_names)} domains)")
            return self.domain_names[i]
        if domain not in self.sizes:
            raise KeyError(f"domain {domain!r} is not in store {self.root} ({self.domain_names})")
        return domain

    def _idx(self, name: str, idx) -> int:
        i = int(idx)
        if not 0 <= i < self.sizes[name]:
            raise IndexError(
                f"sample {i} out of range for domain {name!r} ({self.sizes[name]} samples) in "
                f"store {self.root}"
            )
        return i

    def put(self, domain: str | int, idx: int, loss_S) -> None:
        """Write one row, then its done flag (a reader never sees a half-written row)."""
        if self.mode != "w":
            raise PermissionError(f"reference-loss store {self.root} is open read-only")
        name = self._name(domain)
        i = self._idx(name, idx)
        if isinstance(loss_S, torch.Tensor):
            loss_S = loss_S.detach().float().cpu().numpy()
        row = np.ascontiguousarray(
            np.asarray(loss_S, dtype=np.float32).reshape(-1).astype(self.np_dtype)
        )
        if row.shape[0] != self.seq_len:
            raise ValueError(f"loss row has {row.shape[0]} values, store seq_len is {self.seq_len}")
        fd = self._fd_loss[name]
        data = row.tobytes()
        off = i * self.row_bytes
        while data:
            n = os.pwrite(fd, data, off)
            data, off = data[n:], off + n
        os.pwrite(self._fd_done[name], b"\x01", i)

    def put_batch(self, domains: Iterable, idxs: Iterable, loss_BS) -> None:
        for d, i, row in zip(domains, idxs, loss_BS):
            self.put(d, i, row)

    def flush(self) -> None:
        """Make written rows durable on disk (not needed for readers on the same machine)."""
        for fd in list(self._fd_loss.values()) + list(self._fd_done.values()):
            os.fsync(fd)

    def has(self, domain: str | int, idx: int) -> bool:
        name = self._name(domain)
        i = self._idx(name, idx)
        return bool(self._done[name][i])

    def get(self, domain: str | int, idx: int) -> torch.Tensor | None:
        """The float32 [seq_len] row, or None if not written yet."""
        name = self._name(domain)
        i = self._idx(name, idx)
        if not self._done[name][i]:
            return None
        return torch.from_numpy(np.array(self._loss[name][i], dtype=np.float32))

    def get_batch(self, keys: Sequence[tuple]) -> torch.Tensor | None:
        """[len(keys), seq_len] float32 if every key is done, else None."""
        rows = []
        for d, i in keys:
            r = self.get(d, i)
            if r is None:
                return None
            rows.append(r)
        return torch.stack(rows) if rows else torch.empty(0, self.seq_len)

    def missing(self, keys: Iterable[tuple]) -> list[tuple]:
        return [(d, i) for d, i in keys if not self.has(d, i)]

    def count_done(self, domain: str | int | None = None) -> int:
        names = [self._name(domain)] if domain is not None else self.domain_names
        return int(sum(int(np.count_nonzero(self._done[n])) for n in names if n in self._done))

    def progress(self) -> dict[str, tuple[int, int]]:
        """{domain: (rows done, rows total)}."""
        return {
            n: (int(np.count_nonzero(self._done[n])) if n in self._done else 0, self.sizes[n])
            for n in self.domain_names
        }

    def __repr__(self) -> str:
        return f"RefLossStore({str(self.root)!r}, mode={self.mode!r}, progress={self.progress()})"
