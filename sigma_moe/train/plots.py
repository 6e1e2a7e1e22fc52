"""Plots of a run directory's metrics.jsonl (written at the end of a run, and by `sigma-moe report`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(
        [r["step"] for r in train], [r["lm_loss"] for r in train], label="lm_loss (trained tokens)"
    )
    ax[0].plot(
        [r["step"] for r in train],
        [r["lm_loss_all"] for r in train],
        label="lm_loss_all",
        alpha=0.7,
    )
    (
        ax[0].set_xlabel("step"),
        ax[0].set_ylabel("CE"),
        ax[0].legend(),
        ax[0].set_title("training loss"),
    )
    for k in sorted({k for r in evals for k in r if k.startswith("val_loss/")}):
        ax[1].plot(
            [r["step"] for r in evals if k in r],
            [r[k] for r in evals if k in r],
            marker="o",
            label=k.split("/", 1)[1],
        )
    ax[1].set_xlabel("step"), ax[1].set_title("validation loss per domain"), ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    layers = sorted(
        {k for r in train for k in r if k.startswith("expert_load_max/")},
        key=lambda k: int(k.split("/")[1]),
    )
    if layers:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in layers:
            ax.plot(
                [r["step"] for r in train], [r[k] for r in train], label=f"layer {k.split('/')[1]}"
            )
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        (
            ax.set_xlabel("step"),
            ax.set_ylabel("max / mean tokens per expert"),
            ax.set_title("expert load"),
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written
