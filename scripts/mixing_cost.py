"""Live cost of online-doremi beyond the Rho-1 scorer: tokens/s of two variants of one recipe,
alternating fresh processes (A B A B ...), medians.

    python scripts/mixing_cost.py [--recipe configs/demo-cpu.yaml] [--steps 40] [--repeats 3]

- ``rho1``: Rho-1 selection (``rho1.mode=excess``) with the scorer side process, static blend;
- ``rho1+doremi``: the same plus ``data.mixing.kind=online-doremi`` (update every 10 steps),
  whose reference losses come from the same scorer side process (its plan of the mixer's keys).

Each run is ``python -m sigma_moe train`` with ``OMP_NUM_THREADS=1`` (trainer and scorer), one
metrics line a step, no eval or checkpoint inside the measured steps. Per run: the median step
time over steps >= 5 (start-up and the first scorer waits excluded) -> tokens/s. Per variant:
the median over its runs; the load average is printed before every run (the machine is shared).
The reference (the recipe shrunk as configs/ref-demo.yaml, a few steps: its quality does not
change the cost) is trained once into OUT/ref.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

COMMON = [
    "train.eval_every=100000",
    "checkpoint.every=100000",
    "train.log_every=1",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
]
VARIANTS = {
    "rho1": ["rho1.mode=excess", "rho1.scorer=process"],
    "rho1+doremi": [
        "rho1.mode=excess",
        "rho1.scorer=process",
        "data.mixing.kind=online-doremi",
        "data.mixing.update_every=10",
    ],
}


def train(config: str, out: Path, sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "sigma_moe", "train", config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")


def step_times(run: Path, skip: int = 5) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["step_time_s"] for m in lines if "step_time_s" in m and m["step"] > skip]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="configs/demo-cpu.yaml")
    p.add_argument("--out", default="runs/mixing-cost")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    out = Path(a.out)
    ref = out / "ref"
    if not (ref / "summary.json").is_file():
        ref_sets = [*COMMON, "train.max_steps=20", "train.seed=4321"]
        train("configs/ref-demo.yaml", ref, ref_sets)
    base = [*COMMON, f"train.max_steps={a.steps}", f"rho1.reference={ref / 'checkpoints'}"]
    tokens_per_step = None
    per_run: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(a.repeats):
        for name, sets in VARIANTS.items():
            run = out / f"{name}-{rep}"
            if not (run / "summary.json").is_file():
                load = os.getloadavg()
                print(f"[{name} #{rep}] load average {load[0]:.2f} {load[1]:.2f}", flush=True)
                train(a.recipe, run, [*base, *sets])
            cfg = json.loads((run / "summary.json").read_text())
            tokens_per_step = cfg["tokens"] / cfg["steps"]
            t = statistics.median(step_times(run))
            per_run[name].append(tokens_per_step / t)
            print(f"[{name} #{rep}] {tokens_per_step / t:.0f} tokens/s (median step {t:.3f} s)")
    med = {v: statistics.median(x) for v, x in per_run.items()}
    extra = 1.0 - med["rho1+doremi"] / med["rho1"]
    res = {"tokens_per_s_runs": per_run, "tokens_per_s_median": med, "doremi_extra_cost": extra}
    res["load_average_end"] = os.getloadavg()
    (out / "mixing_cost.json").write_text(json.dumps(res, indent=1))
    print(
        f"median tokens/s: rho1 {med['rho1']:.0f}, rho1+doremi {med['rho1+doremi']:.0f} -> "
        f"online-doremi costs {100 * extra:+.1f}% beyond the Rho-1 scorer "
        f"(load average at the end {res['load_average_end'][0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
