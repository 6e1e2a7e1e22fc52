"""Rho-1 scoring: per-token reference losses for dataset samples, written into the store.

The trainer reads global samples ``0, 1, 2, …`` of its ``TrainDataset`` in order (step ``s``
uses ``[s·G, (s+1)·G)``). The scorer builds the *same* dataset (same domains, seq_len,
num_samples, seed, tokenizer → same sample order) and scores global indices in order, in
batches of ``rho1.scorer_batch_size``, writing rows into the ``RefLossStore`` under their
``(domain, sample index)`` key. Rows already in the store are skipped, so a restart, a resumed
run or a re-run only scores what is missing.

Used by the three places that score: the supervisor's inline mode (``scorer.py``), the side
process (``scorer_worker.py``) and the offline prefill (``score_cli.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sigma_moe.config import RunConfig, config_from_dict
from sigma_moe.data.batch import block_causal_mask, masked_labels
from sigma_moe.data.dataset import build_training_data, collate
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.errors import ScorerFailure
from sigma_moe.rho1.reference import reference_dtype, reference_fingerprint, score_batch
from sigma_moe.rho1.store import RefLossStore, fingerprint_dtype


class ScorerError(ScorerFailure):
    """The scorer cannot deliver reference losses (the trainer saves a checkpoint and stops)."""


# --------------------------------------------------------------------------- shared helpers


def as_run_config(cfg: Any):
    if isinstance(cfg, RunConfig):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    raise TypeError(f"expected a RunConfig or its dict, got {type(cfg).__name__}")


def default_num_samples(cfg) -> int:
    """The trainer's dataset size (``run_training``: max_steps × global_batch_size)."""
    return int(cfg.train.max_steps) * int(cfg.train.global_batch_size)


def build_dataset(cfg, num_samples: int | None = None, tokenizer=None):
    """The trainer's training dataset, deterministically rebuilt from the run config: the static
    blend, or for an online ``data.mixing.kind`` one stream of ``num_samples`` per domain (what
    the mixing run assembly trains on; no global order, keys come from a plan)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
    n = int(num_samples) if num_samples else default_num_samples(cfg)
    return build_training_data(cfg.data, n, cfg.train.seed, tok)


def domain_identities(ds) -> list[str]:
    """Per domain, what fixes the sample at a given index (besides the domain's size)."""
    return [
        f"{Path(p).name}|seed={ds.seed}|seq_len={ds.seq_len}|reset_at_eod={ds.reset_at_eod}"
        for p in ds.prefixes
    ]


def open_store(store_path, ds, mode: str, reference_fingerprint: str | None = None):
    return RefLossStore(
        store_path,
        domain_names=ds.domain_names,
        domain_sizes=ds.domain_sizes,
        seq_len=ds.seq_len,
        mode=mode,
        tokenizer_fingerprint=ds.tokenizer.fingerprint,
        reference_fingerprint=reference_fingerprint,
        domain_identities=domain_identities(ds),
    )


def open_store_checked(store_path, ds, cfg, reference_path: str | None) -> RefLossStore:
    """Open a store read-only (a prefilled one, or the node's scorer's), checked against the
    reference's fingerprint when its folder is here, else at least against
    ``rho1.reference_dtype``: a store scored in the other dtype is refused."""
    dtype = reference_dtype(cfg)
    if reference_path and Path(reference_path).expanduser().exists():
        return open_store(store_path, ds, "r", reference_fingerprint(reference_path, dtype))
    store = open_store(store_path, ds, "r")
    stored = store.meta.get("reference_fingerprint")
    if stored is not None and fingerprint_dtype(stored) != dtype:
        raise ValueError(
            f"store {store_path} was scored by a {fingerprint_dtype(stored)} reference "
            f"({stored!r}) but rho1.reference_dtype resolves to {dtype}"
        )
    return store


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def score_samples(ref, samples: Sequence[dict]) -> torch.Tensor:
    """Reference CE [B, S] for dataset samples (labels masked by loss_mask, as the trainer)."""
    b = collate(list(samples))
    return score_batch(ref, b["input_ids"], masked_labels(b), block_causal_mask(b.get("doc_ids")))


class SampleOwner:
    """Which global samples this node's trainer ranks consume (micro j of a step → rank j % dp)."""

    def __init__(self, global_batch: int, micro_batch: int, dp: int, ranks: Sequence[int] | None):
        self.G, self.mb, self.dp = int(global_batch), int(micro_batch), int(dp)
        self.ranks = None if ranks is None else set(int(r) for r in ranks)

    def __call__(self, idx: int) -> bool:
        if self.ranks is None:
            return True
        j = (idx % self.G) // self.mb
        return (j % self.dp) in self.ranks


def score_keys(ref, ds, store, keys, batch_size: int, on_rows=None) -> int:
    """Score the first ``batch_size`` keys of ``keys`` the store lacks (one batch, so the
    caller re-reads a plan that changed meanwhile); returns the number of rows written."""
    todo = [k for k in dict.fromkeys(keys) if not store.has(*k)][: max(1, int(batch_size))]
    if todo:
        ce = score_samples(ref, [ds.get_domain_sample(d, i) for d, i in todo])
        for (d, i), row in zip(todo, ce):
            store.put(d, i, row)
        if on_rows is not None:
            on_rows(len(todo))
    return len(todo)


def score_range(
    ref,
    ds,
    store,
    start: int,
    stop: int,
    batch_size: int,
    owner=None,
    on_rows=None,
    should_stop=None,
) -> int:
    """Score the missing global samples in [start, stop); returns the number of rows written."""
    written = 0
    pending: list[tuple[int, int]] = []

    def flush() -> None:
        nonlocal written
        samples = [ds.get_domain_sample(d, i) for d, i in pending]
        ce = score_samples(ref, samples)
        for (d, i), row in zip(pending, ce):
            store.put(d, i, row)
        written += len(pending)
        if on_rows is not None:
            on_rows(len(pending))
        pending.clear()

    seen = set()
    for g in range(start, min(stop, len(ds))):
        if should_stop is not None and should_stop():
            break
        if owner is not None and not owner(g):
            continue
        key = ds.domain_and_index(g)
        if key in seen or store.has(*key):
            continue
        seen.add(key)
        pending.append(key)
        if len(pending) >= batch_size:
            flush()
    if pending and not (should_stop is not None and should_stop()):
        flush()
    return written
