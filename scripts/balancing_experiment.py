#!/usr/bin/env python
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

REPO = Path(__file__).resolve().parents[1]
LAYERS = 4  # demo-cpu

VARIANTS: dict[str, list[str]] = {
    "micro_batch": ["model.lb_loss_type=micro_batch"],
    "global_batch": ["model.lb_loss_type=global_batch"],
    "aux_free": ["model.lb_loss_type=none", "model.router_bias_update=aux_free"],
    "none": ["model.lb_loss_type=none"],
    "global_progressive": ["model.lb_loss_type=global_batch"],  # + schedule, see _overrides
}


def _overrides(variant: str, steps: int) -> list[str]:
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
        "parallel.ep_size=2",
        "checkpoint.every=100000",
        "checkpoint.keep_last=1",
        "logging.wandb_mode=disabled",
        "logging.progress=false",
    ]
    extra = []
    if variant == "global_progressive":
        until = max(int(0.4 * steps), 1)
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
    import deepspeed
    import torch

    from sigma_moe.config import load_config
    from sigma_moe.train.loop import run_training

    torch.set_num_threads(1)  # two processes on two cores
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=30))
    for v in variants:
        run_dir = Path(out) / v
        if (run_dir / "summary.json").is_file():
            continue
        cfg = load_config(REPO / "configs" / "demo-cpu.yaml", _overrides(v, steps))
        run_training(cfg, run_dir)


def train_all(out: Path, steps: int, variants: list[str]) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out), steps, variants), nprocs=2, join=True)


# --------------------------------------------------------------------------- analysis


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


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
                statistics.mean(r[f"{key}/{li}"] for r in tail) for li in range(LAYERS)
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
    lines = [
        "| variant | val loss | tokens/s | load max/mean, layers 0-3 | load entropy, layers 0-3 "
        "| idle experts, layers 0-3 |",
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


def plot(out: Path, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("expert_load_max", "load max / mean", True),
        ("expert_load_entropy", "load entropy / log E", False),
        ("expert_idle_frac", "share of idle experts", False),
    ]
    fig, axes = plt.subplots(len(keys), LAYERS, figsize=(4 * LAYERS, 2.8 * len(keys)), sharex=True)
    for v in variants:
        train, _ = _rows(out / v)
        steps = [r["step"] for r in train]
        for i, (key, label, log) in enumerate(keys):
            for li in range(LAYERS):
                ax = axes[i][li]
                ys = [r[f"{key}/{li}"] for r in train]
                # 5-step running mean: one step routes ~1000 tokens over 96 experts
                sm = [statistics.mean(ys[max(0, j - 4) : j + 1]) for j in range(len(ys))]
                ax.plot(steps, sm, label=v, lw=1.2)
                if log:
                    ax.set_yscale("log")
                if i == 0:
                    ax.set_title(f"layer {li}")
                if li == 0:
                    ax.set_ylabel(label)
                if i == len(keys) - 1:
                    ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("96 experts, top-1, demo-cpu model, 2 processes (5-step running means)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--analyse-only", action="store_true", help="skip training")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.analyse_only:
        train_all(a.out, a.steps, a.variants)
    res = summarise(a.out, a.variants)
    (a.out / "balancing_results.json").write_text(json.dumps(res, indent=1))
    (a.out / "balancing_table.md").write_text(table(res))
    plot(a.out, a.variants, a.out / "balancing.png")
    print(table(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
