"""Data path: bundled corpus, tokenizer, prepare (text -> megatron indexed dataset), datasets.

megatron-core (which imports triton) is imported lazily, on the first dataset build or prepare.
"""

from sigma_moe.data.bundled import bundled_data_dir, bundled_prefix, ensure_bundled_data
from sigma_moe.data.corpus import CLEAN_DOMAINS, DOMAINS
from sigma_moe.data.dataset import (
    DomainSpec,
    TrainDataset,
    ValDataset,
    build_train_dataset,
    build_val_datasets,
    collate,
    get_batch,
)
from sigma_moe.data.prepare import check_prefix, prepare_data
from sigma_moe.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

__all__ = [
    "CLEAN_DOMAINS",
    "DOMAINS",
    "DomainSpec",
    "Tokenizer",
    "TrainDataset",
    "ValDataset",
    "build_train_dataset",
    "build_val_datasets",
    "bundled_data_dir",
    "bundled_prefix",
    "check_prefix",
    "collate",
    "ensure_bundled_data",
    "get_batch",
    "load_tokenizer",
    "prepare_data",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
