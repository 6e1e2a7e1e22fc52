"""Suite-wide setup: one bundled-data cache for every test (and the processes tests spawn),
and `gpu` tests skipped without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Building the bundled corpus + datasets takes ~20 s; share it across the suite and runs.
    os.environ.setdefault("SIGMA_MOE_CACHE", str(REPO / ".cache" / "test-data"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
