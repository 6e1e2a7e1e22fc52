"""Load-balancing experiment (docs/balancing.md): the demo-cpu model with 96 experts, top-1,
equal steps, data and seed, trained on 2 gloo processes (data-parallel 2, experts split over
the two: parallel.ep_size=2), once per balancing option:

    python scripts/balancing_experiment.py --out runs/balancing            # all variants
    python scripts/balancing_experiment.py --out /tmp/b --steps 10         # smoke

  micro_batch        N_E·Σ f·p per layer with this process's micro-batch counts
  global_batch       the same with the counts summed over both processes (Sigma-MoE-Tiny)
  aux_free           no balance loss; DeepSeek-V3 router bias, rate 1e-3
  none               no balance loss, no bias
  global_progressive global_batch, layers 0-1 at top-8 for the first 40% of the steps

One pair of processes trains every variant in turn (the start-up, ~2-4 min on a busy 2-core
machine, is paid once). A variant whose summary.json exists is skipped, so a rerun resumes.
Writes DIR/<variant>/ (run folders), DIR/balancing_results.json, DIR/balancing_table.md and
DIR/balancing.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.multiprocessing as mp

from sigma_moe.config import load_config
from sigma_moe.experiments import config_path
from sigma_moe.run import run_training
from sigma_moe.train.engine import free_port

WORLD = 2  # processes: data-parallel 2, parallel.ep_size=2 (one per core here)
# The share of the steps layers 0-1 spend at top-8 in global_progressive (the Sigma-MoE-Tiny
# report's progressive sparsification, shortened to this run's length).
PROGRESSIVE_SHARE = 0.4

VARIANTS: dict[str, list[str]] = {
    "micro_batch": ["model.lb_loss_type=micro_batch"],
    "global_batch": ["model.lb_loss_type=global_batch"],
    "aux_free": ["model.lb_loss_type=none", "model.router_bias_update=aux_free"],
    "none": ["model.lb_loss_type=none"],
    "global_progressive": ["model.lb_loss_type=global_batch"],  # + schedule, see overrides
}


def overrides(variant: str, steps: int) -> list[str]:
    """The demo-cpu recipe's keys this variant sets."""
    common = [
        "model.num_experts=96",
        "model.router_topk=1",
        "model.topk_schedule=[]",
        f"train.max_steps={steps}",
        "train.micro_batch_size=4",  # per process: 4 × 128 = 512 tokens, ~5 per expert
        "train.global_batch_size=8",
        "train.warmup_steps=10",
        f"train.eval_every={max(steps // 2, 1)}",
        "train.log_every=1",
        "data.seq_len=128",
        "data.val_samples_per_domain=16",
        f"parallel.ep_size={WORLD}",
        "checkpoint.every=100000",  # only the final checkpoint
        "checkpoint.keep_last=1",
        "logging.wandb_mode=disabled",
        "logging.progress=false",
    ]
    extra = []
    if variant == "global_progressive":
        until = max(int(PROGRESSIVE_SHARE * steps), 1)
        extra = [f"model.topk_schedule=[{{until_step: {until}, layers: [0, 1], topk: 8}}]"]
    return common + VARIANTS[variant] + extra


def _worker(rank: int, world: int, port: int, out: str, steps: int, variants: list[str]):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)  # two processes on two cores
    # 30 min: the first collective waits for the other rank's start-up on a loaded machine
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=30))
    for v in variants:
        run_dir = Path(out) / v
        if (run_dir / "summary.json").is_file():
            continue
        run_training(load_config(config_path("demo-cpu.yaml"), overrides(v, steps)), run_dir)


def train_all(out: Path, steps: int, variants: list[str]) -> None:
    args = (WORLD, free_port(), str(out), steps, variants)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)


# --------------------------------------------------------------------------- analysis


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def _layers(row: dict) -> int:
    """The model's layer count, from one metrics line (`expert_load_max/<layer>` keys)."""
    return sum(1 for k in row if k.startswith("expert_load_max/"))


def summarise(out: Path, variants: list[str]) -> dict:
    """Per variant: final validation loss, median tokens/s, and per layer the balance figures
    averaged over the last quarter of the steps (one step's counts are noisy at ~5 tokens per
    expert per micro-batch)."""
    res: dict = {}
    for v in variants:
        train, evals = _rows(out / v)
        tail = train[-max(len(train) // 4, 1) :]
        per_layer = {}
        for key in ("expert_load_max", "expert_load_cv", "expert_load_entropy", "expert_idle_frac"):
            per_layer[key] = [
                statistics.mean(r[f"{key}/{li}"] for r in tail) for li in range(_layers(tail[0]))
            ]
        res[v] = {
            "steps": train[-1]["step"],
            "val_loss_start": evals[0]["val_loss"],
            "val_loss": evals[-1]["val_loss"],
            "lm_loss_last_quarter": statistics.mean(r["lm_loss_all"] for r in tail),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train),
            "last_quarter": per_layer,
        }
    return res


def table(res: dict) -> str:
    n = len(next(iter(res.values()))["last_quarter"]["expert_load_max"])
    layers = f"layers 0-{n - 1}"
    lines = [
        f"| variant | val loss | tokens/s | load max/mean, {layers} | load entropy, {layers} "
        f"| idle experts, {layers} |",
        "|---|---|---|---|---|---|",
    ]
    for v, r in res.items():
        q = r["last_quarter"]

        def fmt(key, spec, q=q):
            return " / ".join(format(x, spec) for x in q[key])

        lines.append(
            f"| {v} | {r['val_loss']:.3f} | {r['tokens_per_s_median']:.0f} | "
            f"{fmt('expert_load_max', '.1f')} | {fmt('expert_load_entropy', '.2f')} | "
            f"{fmt('expert_idle_frac', '.0%')} |"
        )
    return "\n".join(lines) + "\n"


def _running_mean(ys: list[float], window: int) -> list[float]:
    return [statistics.mean(ys[max(0, j - window + 1) : j + 1]) for j in range(len(ys))]


def plot(out: Path, variants: list[str], path: Path) -> None:
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("expert_load_max", "load max / mean", True),
        ("expert_load_entropy", "load entropy / log E", False),
        ("expert_idle_frac", "share of idle experts", False),
    ]
    runs = {v: _rows(out / v)[0] for v in variants}
    n_layers = _layers(next(iter(runs.values()))[0])
    fig, axes = plt.subplots(
        len(keys), n_layers, figsize=(4 * n_layers, 2.8 * len(keys)), sharex=True, squeeze=False
    )
    for v, train in runs.items():
        steps = [r["step"] for r in train]
        for i, (key, label, log) in enumerate(keys):
            for li in range(n_layers):
                ax = axes[i][li]
                # 5-step running mean: one step routes ~1000 tokens over 96 experts
                ax.plot(steps, _running_mean([r[f"{key}/{li}"] for r in train], 5), label=v, lw=1.2)
                if log:
                    ax.set_yscale("log")
                if i == 0:
                    ax.set_title(f"layer {li}")
                if li == 0:
                    ax.set_ylabel(label)
                if i == len(keys) - 1:
                    ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"96 experts, top-1, demo-cpu model, {WORLD} processes (5-step running means)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="balancing_experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--analyse-only", action="store_true", help="skip training")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.analyse_only:
        train_all(a.out, a.steps, a.variants)
    res = summarise(a.out, a.variants)
    (a.out / "balancing_results.json").write_text(json.dumps(res, indent=1))
    (a.out / "balancing_table.md").write_text(table(res))
    plot(a.out, a.variants, a.out / "balancing.png")
    print(table(res), file=sys.stderr)
    return 0
