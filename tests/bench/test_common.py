"""Benchmark machinery shared by the fresh-process comparisons."""

from __future__ import annotations

from collections import Counter

from sigma_moe.bench.common import rotated_rounds


def test_rotated_rounds_run_every_name_once_a_round_in_a_rotated_order():
    rounds = rotated_rounds(["none", "live", "inline", "prefilled"], 4)
    assert len(rounds) == 16
    by_round = [[n for r, n in rounds if r == k] for k in range(4)]
    assert by_round[0] == ["none", "live", "inline", "prefilled"]
    assert by_round[1] == ["live", "inline", "prefilled", "none"]
    # every name once a round, and each first in exactly one round
    assert all(sorted(b) == sorted(by_round[0]) for b in by_round)
    assert Counter(b[0] for b in by_round) == Counter(by_round[0])
    # rounds run in order: the round index never goes back
    assert [r for r, _ in rounds] == sorted(r for r, _ in rounds)


def test_rotated_rounds_edge_cases():
    assert rotated_rounds([], 3) == []
    assert rotated_rounds(["a"], 2) == [(0, "a"), (1, "a")]
    assert rotated_rounds(["a", "b"], 0) == []
