"""Training and validation datasets over prepared domains (megatron-core GPTDataset + blending).

Sample dict (every value a torch tensor)::

    input_ids     int64   [S]   tokens t_0 .. t_{S-1}
    labels        int64   [S]   tokens t_1 .. t_S (next-token targets)
    loss_mask     float32 [S]   0 where position i must not be trained on (see below)
    position_ids  int64   [S]   0..S-1, or restarting after every EOD when reset_at_eod
    domain        int64   []    index into the ``domains`` list given to the builder
    sample_index  int64   []    index of the sample inside that domain's GPTDataset
    doc_ids       int32   [S]   only when reset_at_eod: document number of each position
                                (an EOD belongs to the document it ends), for a block-diagonal
                                attention mask: attend(i, j) iff j <= i and doc_ids[i] == doc_ids[j]

Loss-mask semantics (megatron's ``eod_mask_loss``): documents are packed back to back, each
ending with EOD. Position i predicts ``labels[i]`` from ``input_ids[..i]``. Where
``input_ids[i] == EOD`` the target is the first token of the *next* document, which cannot be
predicted from the previous one, so ``loss_mask[i] = 0``. The position whose *label* is EOD
(the last token of a document predicting its end) stays trained: the model learns to end
documents. Everything else is 1.

Identity of samples: global index ``i`` of a ``TrainDataset`` maps to ``(domain, sample_index)``
via megatron's blending indices (``domain_and_index``, no token read). ``sample_index`` is stable
for a given (prefix, seed, seq_len, per-domain sample count) — the Rho-1 reference-loss store
keys on it. Changing ``num_samples``, the weights, the seed or ``seq_len`` changes the samples:
a resumed run must keep them identical (``identity`` summarises them for such checks).

Index files are cached by megatron under ``<prefix>/cache/``; with ``torch.distributed``
initialised megatron builds them on rank 0 and the others wait on a barrier; the writing process
additionally holds an ``fcntl`` lock per prefix, so separate processes (e.g. the scorer side
process and the trainer) never read half-written index files.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigma_moe.data.bundled import bundled_prefix, file_lock
from sigma_moe.data.prepare import check_prefix
from sigma_moe.data.tokenizer import Tokenizer, load_tokenizer

VAL_SEED = 1234  # fixed: validation samples never depend on the training seed

# megatron logs "Cannot save the BlendedDataset indexes because path_to_cache is None" at
# WARNING on every build: expected here (the blending index is rebuilt in ~ms), so hide it.
logging.getLogger("megatron.core.datasets.blended_dataset").setLevel(logging.ERROR)


@dataclass
class DomainSpec:
    """What the config's ``data.domains`` entries look like (any object with these works)."""

    name: str
    path: str
    weight: float = 1.0
    clean: bool = False


def _resolve_prefix(domain: Any, val: bool = False, cache_dir=None) -> str:
    """``path: bundled`` → the bundled dataset named like the domain; ``bundled:NAME`` → NAME."""
    path = str(domain.path)
    if path == "bundled" or path.startswith("bundled:"):
        name = domain.name if path == "bundled" else path.split(":", 1)[1]
        return bundled_prefix(name, cache_dir=cache_dir, val=val)
    prefix = os.path.expanduser(path)
    for ext in (".bin", ".idx"):  # tolerate a prefix given with its extension
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return f"{prefix}-val" if val else prefix


def _check_domains(domains: Sequence[Any]) -> None:
    if not domains:
        raise ValueError("data.domains is empty: give at least one domain")
    names = [d.name for d in domains]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"data.domains: duplicate domain name(s) {sorted(dup)}")
    for d in domains:
        w = float(getattr(d, "weight", 1.0))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"data.domains[{d.name}].weight must be >= 0, got {w}")
    if not any(float(getattr(d, "weight", 1.0)) > 0 for d in domains):
        raise ValueError("data.domains: every weight is 0; at least one domain must be trained on")


def _is_writer_rank() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _build_with_locks(prefixes: list[str], builder) -> list:
    """Run ``builder.build()``; the process that writes index files holds a lock per prefix."""
    with ExitStack() as stack:
        if _is_writer_rank():
            for p in sorted(set(prefixes)):
                pp = Path(p)
                stack.enter_context(file_lock(pp.parent / f".{pp.name}.index.lock"))
                # Rebuild megatron's sample indices every time (milliseconds here): a stale
                # index cache left by a killed run was seen to feed garbage samples to later
                # runs of the test suite. Readers of the old files keep their mmaps.
                shutil.rmtree(pp / "cache", ignore_errors=True)
        return builder.build()


def _gpt_config(prefixes, weights, seq_len, seed, tokenizer, reset_at_eod):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_len),
        blend=(list(prefixes), weights),
        split="100,0,0",
        reset_position_ids=bool(reset_at_eod),
        reset_attention_mask=False,  # attention reset is the model's job (doc_ids)
        eod_mask_loss=True,
        create_attention_mask=False,
        tokenizer=tokenizer,
        path_to_cache=None,  # megatron uses <prefix>/cache/ (no process group needed)
        mmap_bin_files=True,
    )


class _SampleMaker:
    def __init__(self, eod: int, reset_at_eod: bool):
        self.eod = eod
        self.reset_at_eod = reset_at_eod

    def __call__(self, raw: dict, domain_id: int, sample_index: int) -> dict[str, torch.Tensor]:
        tokens = raw["tokens"].long()
        out = {
            "input_ids": tokens,
            "labels": raw["labels"].long(),
            "loss_mask": raw["loss_mask"].float(),
            "position_ids": raw["position_ids"].long(),
            "domain": torch.tensor(domain_id, dtype=torch.int64),
            "sample_index": torch.tensor(sample_index, dtype=torch.int64),
        }
        if self.reset_at_eod:
            is_eod = (tokens == self.eod).to(torch.int32)
            out["doc_ids"] = (torch.cumsum(is_eod, 0, dtype=torch.int32) - is_eod).to(torch.int32)
        return out


class TrainDataset(torch.utils.data.Dataset):
    """The blended training stream; ``ds[consumed + i]`` reads any sample directly."""

    def __init__(
        self,
        domains: Sequence[Any],
        prefixes: list[str],
        datasets: list,
        dataset_index: np.ndarray,
        dataset_sample_index: np.ndarray,
        tokenizer: Tokenizer,
        seq_len: int,
        num_samples: int,
        seed: int,
        reset_at_eod: bool,
        weights: list[float],
    ):
        self.domains = list(domains)
        self.domain_names = [d.name for d in domains]
        self.clean = [bool(getattr(d, "clean", False)) for d in domains]
        self.prefixes = prefixes
        self.datasets = datasets
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        self.reset_at_eod = reset_at_eod
        self.weights = weights
        self.domain_sizes = [0 if ds is None else len(ds) for ds in datasets]
        self._make = _SampleMaker(tokenizer.eod, reset_at_eod)

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def _check(self, idx: int) -> int:
        idx = int(idx)
        if idx < 0 or idx >= len(self):
            raise IndexError(
                f"sample {idx} out of range: this dataset has {len(self)} samples "
                f"(built for num_samples={self.num_samples})"
            )
        return idx

    def domain_and_index(self, idx: int) -> tuple[int, int]:
        """(domain id, sample index within that domain's dataset) of global sample ``idx``."""
        idx = self._check(idx)
        return int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])

    def get_domain_sample(self, domain_id: int, sample_index: int) -> dict[str, torch.Tensor]:
        domain_id, sample_index = int(domain_id), int(sample_index)
        if not 0 <= domain_id < len(self.datasets):
            raise IndexError(f"domain id {domain_id} out of range ({len(self.datasets)} domains)")
        if self.datasets[domain_id] is None:
            raise IndexError(
                f"domain {self.domain_names[domain_id]!r} has weight 0: it has no training samples"
            )
        if not 0 <= sample_index < self.domain_sizes[domain_id]:
            raise IndexError(
                f"sample {sample_index} out of range for domain {self.domain_names[domain_id]!r} "
                f"({self.domain_sizes[domain_id]} samples)"
            )
        return self._make(self.datasets[domain_id][sample_index], domain_id, sample_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.get_domain_sample(*self.domain_and_index(idx))

    def domain_counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """How many of the global samples [start, stop) come from each domain."""
        stop = len(self) if stop is None else stop
        return np.bincount(self.dataset_index[start:stop], minlength=len(self.datasets))

    @property
    def identity(self) -> dict:
        """What determines the sample order; a resumed run must match it exactly."""
        return {
            "prefixes": list(self.prefixes),
            "weights": [float(w) for w in self.weights],
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "domain_sizes": list(self.domain_sizes),
        }


def build_train_dataset(
    domains: Sequence[Any],
    seq_len: int,
    num_samples: int,
    seed: int,
    tokenizer: Tokenizer | str = "bundled",
    reset_at_eod: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> TrainDataset:
    """Blend the domains with static weights into ``>= num_samples`` packed sequences.

    ``domains``: objects with ``name``, ``path`` (a prepare-data prefix, or ``"bundled"``),
    ``weight`` and ``clean``. Deterministic for a given seed. ``cache_dir`` only affects where
    bundled data is built (default ``$SIGMA_MOE_CACHE`` / ``~/.cache/sigma-moe``).
    """
    if int(seq_len) < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _check_domains(domains)
    tok = load_tokenizer(tokenizer)
    raw_w = [float(getattr(d, "weight", 1.0)) for d in domains]
    # weight 0: the domain keeps its id (for eval / logging) but is not in the training blend
    active = [i for i, w in enumerate(raw_w) if w > 0]
    all_prefixes = [_resolve_prefix(d, cache_dir=cache_dir) for d in domains]
    prefixes = [all_prefixes[i] for i in active]
    for p in prefixes:
        check_prefix(p, tok)
    weights = [w / sum(raw_w) for w in raw_w]

    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    single = len(active) == 1
    blend_w = None if single else [weights[i] for i in active]
    config = _gpt_config(prefixes, blend_w, seq_len, seed, tok, reset_at_eod)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [int(num_samples), 0, 0], lambda: True, config
    )
    top = _build_with_locks(prefixes, builder)[0]
    if isinstance(top, BlendedDataset):
        built = list(top.datasets)
        local_index = np.asarray(top.dataset_index)
        dataset_sample_index = np.asarray(top.dataset_sample_index)
    else:
        built = [top]
        local_index = np.zeros(len(top), dtype=np.int16)
        dataset_sample_index = np.arange(len(top), dtype=np.int64)
    datasets: list = [None] * len(domains)
    for j, i in enumerate(active):
        datasets[i] = built[j]
    dataset_index = np.asarray(active, dtype=np.int16)[local_index]
    return TrainDataset(
        domains,
        all_prefixes,
        datasets,
        dataset_index,
        dataset_sample_index,
        tok,
        int(seq_len),
        int(num_samples),
        int(seed),
        bool(reset_at_eod),
        weights,
    )


def domain_token_counts(
    domains: Sequence[Any],
    tokenizer: Tokenizer | str = "bundled",
    cache_dir: str | os.PathLike | None = None,
) -> list[int]:
    """Training tokens of each domain's prefix: the natural mixture is their share."""
    tok = load_tokenizer(tokenizer)
    return [
        int(check_prefix(_resolve_prefix(d, cache_dir=cache_dir), tok)["num_tokens"])
        for d in domains
    ]


def build_domain_streams(
    domains: Sequence[Any],
    seq_len: int,
    samples_per_domain: int,
    seed: int,
    tokenizer: Tokenizer | str = "bundled",
    reset_at_eod: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> TrainDataset:
    """One shuffled stream per domain, for online mixing (no global blend order).

    Megatron's blend fixes every global index's domain when the index is built; an online mixer
    decides the domain of each sample during the run. So each domain gets its own GPTDataset of
    ``samples_per_domain`` sequences (enough for any mixture: the whole run may read one domain)
    and a sampler addresses samples as ``(domain id, sample index)`` through
    ``get_domain_sample``. Domain ``d``'s sample ``i`` is the same for every run with the same
    (prefix, seed, seq_len, samples_per_domain), so the Rho-1 store keys stay meaningful. Every
    domain is built, whatever its configured weight (the mixer may raise it). The returned
    dataset has no global order: ``len()`` is 0 and ``ds[i]`` raises IndexError.
    """
    if int(seq_len) < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if int(samples_per_domain) < 1:
        raise ValueError(f"samples_per_domain must be >= 1, got {samples_per_domain}")
    _check_domains(domains)
    tok = load_tokenizer(tokenizer)
    prefixes = [_resolve_prefix(d, cache_dir=cache_dir) for d in domains]
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    datasets = []
    for p in prefixes:
        check_prefix(p, tok)
        config = _gpt_config([p], None, seq_len, seed, tok, reset_at_eod)
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, [int(samples_per_domain), 0, 0], lambda: True, config
        )
        datasets.append(_build_with_locks([p], builder)[0])
    raw_w = [float(getattr(d, "weight", 1.0)) for d in domains]
    return TrainDataset(
        domains,
        prefixes,
        datasets,
        np.zeros(0, dtype=np.int16),
        np.zeros(0, dtype=np.int64),
        tok,
        int(seq_len),
        int(samples_per_domain),
        int(seed),
        bool(reset_at_eod),
        [w / sum(raw_w) for w in raw_w],
    )


def build_training_data(
    data: Any,
    num_samples: int,
    seed: int,
    tokenizer: Tokenizer | str = "bundled",
    cache_dir: str | os.PathLike | None = None,
) -> TrainDataset:
    """The training data a run's ``data`` section describes (``domains``, ``seq_len``,
    ``reset_at_eod``, ``mixing.kind``) for ``num_samples`` samples of seed ``seed`` (the
    ``train`` section's): the static blend (``build_train_dataset``), or for an online mixing
    kind one stream of ``num_samples`` per domain (``build_domain_streams``: any domain may be
    read by every sample). The trainer, the mixing run assembly and the Rho-1 scorer, which
    rebuilds the trainer's data in its side process, all build it here."""
    build = build_train_dataset if data.mixing.kind == "static" else build_domain_streams
    return build(
        data.domains,
        data.seq_len,
        num_samples,
        seed,
        tokenizer,
        reset_at_eod=data.reset_at_eod,
        cache_dir=cache_dir,
    )


class ValDataset(torch.utils.data.Dataset):
    """The first ``len`` samples of one epoch over a domain's ``-val`` prefix (fixed order)."""

    def __init__(self, name, domain_id, prefix, dataset, length, tokenizer, reset_at_eod, clean):
        self.name = name
        self.domain_id = domain_id
        self.prefix = prefix
        self.dataset = dataset
        self.length = length
        self.clean = clean
        self.tokenizer = tokenizer
        self._make = _SampleMaker(tokenizer.eod, reset_at_eod)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if idx < 0 or idx >= self.length:
            raise IndexError(f"val sample {idx} out of range ({self.length} for {self.name!r})")
        return self._make(self.dataset[idx], self.domain_id, idx)


def build_val_datasets(
    domains: Sequence[Any],
    seq_len: int,
    tokenizer: Tokenizer | str = "bundled",
    max_samples_per_domain: int | None = 64,
    reset_at_eod: bool = False,
    cache_dir: str | os.PathLike | None = None,
    missing: str = "error",
) -> dict[str, ValDataset]:
    """One ``ValDataset`` per domain over ``<path>-val`` (same order on every run and rank).

    ``missing="skip"`` leaves out domains without a ``-val`` prefix instead of raising
    FileNotFoundError (e.g. data prepared with ``--val-fraction 0``).
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    _check_domains(domains)
    tok = load_tokenizer(tokenizer)
    out: dict[str, ValDataset] = {}
    for i, d in enumerate(domains):
        prefix = _resolve_prefix(d, val=True, cache_dir=cache_dir)
        try:
            info = check_prefix(prefix, tok)
        except FileNotFoundError:
            if missing == "skip":
                continue
            raise
        if info["num_tokens"] < int(seq_len) + 1:
            raise ValueError(
                f"validation set {prefix!r} has {info['num_tokens']} tokens, fewer than one "
                f"sequence of seq_len={seq_len}; prepare it with a larger --val-fraction"
            )
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset

        config = _gpt_config([prefix], None, seq_len, VAL_SEED, tok, reset_at_eod)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [None, 0, 0], lambda: True, config)
        ds = _build_with_locks([prefix], builder)[0]
        n = len(ds) if max_samples_per_domain is None else min(len(ds), int(max_samples_per_domain))
        out[d.name] = ValDataset(
            d.name, i, prefix, ds, n, tok, reset_at_eod, bool(getattr(d, "clean", False))
        )
    return out


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a batch dict (scalars become [B] tensors)."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    keys = samples[0].keys()
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


def get_batch(dataset, start: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Samples ``start .. start + batch_size - 1`` of ``dataset``, collated."""
    return collate([dataset[start + i] for i in range(batch_size)])
