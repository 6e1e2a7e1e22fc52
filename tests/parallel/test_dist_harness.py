"""The test harness itself: with retry_on_signal a worker killed by a signal gets one retry, a
second crash and a Python error fail at once; without it a signal death fails at once. No
process group (init="none"): a peer's crash cannot turn into a gloo error on the other rank."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from _dist import read_results, run_distributed, write_result

pytestmark = pytest.mark.distributed


def _abort_first_time(rank: int, world: int, out_dir: str) -> None:
    mark = Path(out_dir, f"tried{rank}")
    if rank == 0 and not mark.exists():
        mark.write_text("1")
        os.kill(os.getpid(), signal.SIGABRT)
    write_result(out_dir, rank, {"rank": rank})


def _abort_always(rank: int, world: int, out_dir: str) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGABRT)


def _raise(rank: int, world: int, out_dir: str) -> None:
    Path(out_dir, f"ran{rank}-{os.getpid()}").write_text("1")
    raise ValueError("a real failure")


def test_signal_death_is_retried_once(tmp_path):
    with pytest.warns(UserWarning, match="SIGABRT.*retrying once"):
        run_distributed(_abort_first_time, 2, str(tmp_path), init="none", retry_on_signal=True)
    assert [r["rank"] for r in read_results(tmp_path, 2)] == [0, 1]


def test_second_signal_death_fails(tmp_path):
    with pytest.warns(UserWarning, match="retrying once"):
        with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
            run_distributed(_abort_always, 2, str(tmp_path), init="none", retry_on_signal=True)


def test_signal_death_without_opt_in_fails_at_once(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_distributed(_abort_first_time, 2, str(tmp_path), init="none")
    assert len(list(tmp_path.glob("tried0"))) == 1


def test_python_error_is_not_retried(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a real failure"):
        run_distributed(_raise, 2, str(tmp_path), init="none", retry_on_signal=True)
    assert len(list(tmp_path.glob("ran0-*"))) == 1  # one attempt only
