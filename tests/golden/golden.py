"""Golden per-step losses that refactors must reproduce bitwise (torchtitan keeps such files).

Three runs, each a fresh `sigma-moe train` process with one thread (a GEMM's result depends on
how many threads split it, so the thread count is part of the golden setting):

- ``demo-cpu``: `configs/demo-cpu.yaml`, 20 steps, fp32, Rho-1 off (the recipe's ZeRO stage);
- ``rho1-inline``: `configs/test-tiny.yaml` with Rho-1 excess-loss selection, the scorer inline,
  10 steps, against a tiny transformers Qwen3 reference built from a fixed seed;
- ``ep2``: `configs/test-tiny.yaml`, EP=2 on 2 gloo processes (`launch/pretrain.sh`), 8 steps.

``python tests/golden/golden.py --write`` regenerates ``golden_losses.json`` (only when a change
is *meant* to change the numbers: say so in the commit); ``tests/golden/test_golden.py``
compares.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sigma_moe.train.engine import child_env

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_losses.json")
sys.path.insert(0, str(REPO / "tests" / "rho1"))

COMMON = [
    "train.precision=fp32",
    "train.log_every=1",
    "train.eval_every=100000",
    "checkpoint.every=100000",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
]


def _env() -> dict[str, str]:
    # A rendezvous left in the environment by an in-process test (MASTER_PORT still held by the
    # pytest process) made the golden runs fail with EADDRINUSE in CI: start clean.
    return child_env(OMP_NUM_THREADS="1", SIGMA_MOE_THREADS="1", PYTHON=sys.executable)


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and "val_loss" not in m]
    return [m["loss"] for m in sorted(steps, key=lambda m: m["step"])]


def _run(cmd: list[str], out: Path) -> list[float]:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return _losses(out)


def _train(config: str, out: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "sigma_moe", "train", str(REPO / config), "--out", str(out)]
    return cmd + [a for s in COMMON + sets for a in ("--set", s)]


def run_demo_cpu(tmp: Path) -> list[float]:
    out = tmp / "demo-cpu"
    return _run(_train("configs/demo-cpu.yaml", out, ["train.max_steps=20", "rho1.mode=none"]), out)


def run_rho1_inline(tmp: Path) -> list[float]:
    from _rho1_helpers import make_hf_reference

    ref = make_hf_reference(tmp / "hf-ref", seed=0)
    out = tmp / "rho1-inline"
    sets = [
        "train.max_steps=10",
        "rho1.mode=excess",
        "rho1.scorer=inline",
        f"rho1.reference={ref}",
        "rho1.select_ratio=0.6",
    ]
    return _run(_train("configs/test-tiny.yaml", out, sets), out)


def run_ep2(tmp: Path) -> list[float]:
    out = tmp / "ep2"
    cmd = [
        str(REPO / "launch" / "pretrain.sh"),
        "--nproc",
        "2",
        str(REPO / "configs/test-tiny.yaml"),
    ]
    cmd += ["--out", str(out)]
    sets = COMMON + [
        "train.max_steps=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "parallel.ep_size=2",
        "rho1.mode=none",
    ]
    return _run(cmd + [a for s in sets for a in ("--set", s)], out)


RUNS = {"demo-cpu": run_demo_cpu, "rho1-inline": run_rho1_inline, "ep2": run_ep2}


def run_all(names=None) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="sigma-moe-golden-") as d:
        return {n: RUNS[n](Path(d)) for n in (names or RUNS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"write {GOLDEN.name}")
    p.add_argument("runs", nargs="*", help=f"a subset of {sorted(RUNS)}")
    a = p.parse_args()
    unknown = sorted(set(a.runs) - set(RUNS))
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {sorted(RUNS)}")
    got = run_all(a.runs or None)
    print(json.dumps(got, indent=1))
    if a.write:
        old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        GOLDEN.write_text(json.dumps({**old, **got}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
