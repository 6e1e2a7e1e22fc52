"""Runner for the mixing resume tests (a subprocess, so SIGKILL is real):

    python tests/mixing/_mix_runner.py RUN_DIR [--resume auto] [--kill-at STEP] [--set k=v ...]

The config is tests/train/_ckpt_util.py's (test-tiny, 7 steps, a checkpoint every 2) plus the
--set overrides; the run goes through the mixing run assembly (as `sigma-moe train`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "train"))

from _ckpt_util import Signal, config  # noqa: E402


def main(argv: list[str]) -> int:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--resume", default="none")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from sigma_moe.run import run_training

    cbs = [Signal(a.kill_at, signal.SIGKILL)] if a.kill_at else []
    try:
        run_training(config(*a.set), a.run_dir, resume=a.resume, extra_callbacks=cbs)
    except ValueError as e:
        print(f"[test] error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
