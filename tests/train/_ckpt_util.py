"""Helpers for the checkpoint / resume / reshape tests, and a runner for subprocess tests:

    python tests/train/_ckpt_util.py RUN_DIR [--resume auto] [--kill-in-save STEP]
        [--kill-at STEP] [--term-at STEP] [--set key=value ...]

--kill-in-save STEP: SIGKILL this process while the checkpoint of STEP is being written (after
DeepSpeed wrote its files, while our RNG file is written: before publication).
--kill-at STEP: SIGKILL after STEP finished (not a save step: mid-training).
--term-at STEP: send SIGTERM to this process after STEP (the run must save and exit cleanly).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python")

# 7 steps, a checkpoint every 2: 2, 4, 6 and the end (7); 5 steps follow the step-2 checkpoint.
BASE_SETS = [
    "train.max_steps=7",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.eval_every=3",
    "data.val_samples_per_domain=2",
    "checkpoint.every=2",
    "checkpoint.keep_last=4",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


def config(*extra: str):
    from sigma_moe.config import load_config

    return load_config(str(REPO / "configs" / "test-tiny.yaml"), BASE_SETS + list(extra))


def losses(run_dir: Path) -> dict[int, float]:
    """step → loss; a step trained twice (replayed after a kill) keeps its last value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def evals(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "val_loss" in m:
            out[m["step"]] = m["val_loss"]
    return out


def subprocess_env() -> dict[str, str]:
    from sigma_moe.train.engine import child_env  # the rendezvous keys dropped in one place

    env = child_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("SIGMA_MOE_CACHE", str(REPO / ".cache" / "test-data"))
    return env


class Signal:
    """Callback: send `sig` to this process after step `step`."""

    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_step_end(self, trainer, m):
        if m["step"] == self.step:
            os.kill(os.getpid(), self.sig)


def _main(argv: list[str]) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--resume", default="none")
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--term-at", type=int)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from sigma_moe.train.loop import run_training

    cbs = []
    if a.kill_at:
        cbs.append(Signal(a.kill_at, signal.SIGKILL))
    if a.term_at:
        cbs.append(Signal(a.term_at, signal.SIGTERM))
    if a.kill_in_save:
        real_save = torch.save
        tag = f"step_{a.kill_in_save:08d}.tmp-"

        def save(obj, f, *args, **kw):
            if tag in str(f) and "rng_rank" in str(f):
                print(f"[test] SIGKILL while writing {f}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kw)

        torch.save = save
    run_training(config(*a.set), a.run_dir, resume=a.resume, extra_callbacks=cbs)
    print("[test] run_training returned", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_main(sys.argv[1:]))


# --------------------------------------------------------------------------- in-process runs


_BASELINE: dict[str, Path] = {}


def train_in_process(cfg, run_dir, resume="none", extra_callbacks=None):
    """run_training in this process with one thread (as the subprocesses), restoring the
    signal handlers it installs."""
    import torch

    from sigma_moe.train.loop import run_training

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(cfg, run_dir, resume=resume, extra_callbacks=extra_callbacks)
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)


def baseline_run() -> Path:
    """The uninterrupted reference run (7 steps, checkpoints 2, 4, 6, 7), built once per session."""
    if "dir" not in _BASELINE:
        import atexit
        import shutil
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="sigma-moe-baseline-")) / "run"
        atexit.register(shutil.rmtree, d.parent, True)
        train_in_process(config(), d)
        _BASELINE["dir"] = d
    return _BASELINE["dir"]
