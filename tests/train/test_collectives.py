"""train.collectives: every rank gets the same answer from agree_all / agree_any (2 gloo
processes), and a single process gets its own flag back."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))

from _dist import run_distributed  # noqa: E402

from sigma_moe.train.collectives import agree_all, agree_any  # noqa: E402


def _check(rank: int, world_size: int) -> None:
    one_false = rank == 1
    assert agree_all(not one_false) is False
    assert agree_any(one_false) is True
    assert agree_all(True) is True and agree_any(False) is False
    # a tensor flag (the loop's isfinite of the loss) is reduced on its own device
    loss = torch.tensor(float("nan") if one_false else 1.0)
    assert agree_all(torch.isfinite(loss)) is False
    assert agree_all(torch.isfinite(torch.tensor(1.0)), device="cpu") is True


def test_two_ranks_agree():
    run_distributed(_check, 2)


def test_one_process_returns_its_flag():
    assert agree_all(True) and not agree_all(False)
    assert agree_any(torch.tensor(True)) and not agree_any(torch.tensor(False))
