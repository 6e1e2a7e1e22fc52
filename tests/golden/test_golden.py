"""Refactors must reproduce the committed per-step losses bitwise (see golden.py for the runs
and how to regenerate them when a change is meant to alter the numbers)."""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN, RUNS, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def got() -> dict[str, list[float]]:
    return run_all()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_losses_bitwise(got, name):
    want = json.loads(GOLDEN.read_text())[name]
    assert len(got[name]) == len(want), (name, got[name])
    diffs = [(i + 1, g, w) for i, (g, w) in enumerate(zip(got[name], want)) if g != w]
    assert not diffs, f"{name}: steps whose loss changed (step, now, golden): {diffs}"
