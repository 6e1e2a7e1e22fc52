"""Data-test fixtures. ``bundled_data_dir`` builds the bundled datasets once per session.

If ``SIGMA_MOE_CACHE`` is already set (e.g. by a top-level conftest) that cache is used;
otherwise a session temp folder is, and ``SIGMA_MOE_CACHE`` points to it for the session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory) -> Path:
    old = os.environ.get("SIGMA_MOE_CACHE")
    if old:
        yield Path(old)
        return
    cache = tmp_path_factory.mktemp("sigma_moe_cache")
    os.environ["SIGMA_MOE_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        os.environ.pop("SIGMA_MOE_CACHE", None)


@pytest.fixture(scope="session")
def bundled_data_dir(bundled_cache) -> Path:
    from sigma_moe.data.bundled import ensure_bundled_data

    return ensure_bundled_data(bundled_cache)


@pytest.fixture(scope="session")
def bundled_domains(bundled_data_dir):
    from sigma_moe.data.dataset import DomainSpec

    return [
        DomainSpec("prose", "bundled", 0.4, True),
        DomainSpec("code", "bundled", 0.2, True),
        DomainSpec("math", "bundled", 0.1, True),
        DomainSpec("webnoise", "bundled", 0.3, False),
    ]
