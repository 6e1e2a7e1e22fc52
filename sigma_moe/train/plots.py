"""PNG plots of a run directory's metrics.jsonl (written at the end of a run and by
`sigma-moe report`). Each plot function returns its path, or None when the run did not record
what it shows (the report leaves it out rather than drawing an empty frame)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
RHO1_SELECTION = "rho1_selection.json"  # the Rho-1 callback's whole-run counts
EXPERT_LOAD = "expert_load.jsonl"  # per-expert token counts by layer and domain, per eval


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _keys(rows: list[dict], prefix: str) -> list[str]:
    """`prefix/<name>` keys in first-seen order (layers sort numerically)."""
    seen = dict.fromkeys(k for r in rows for k in r if k.startswith(prefix + "/"))
    ks = list(seen)
    if all(k.split("/", 1)[1].isdigit() for k in ks):
        ks.sort(key=lambda k: int(k.split("/", 1)[1]))
    return ks


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "step":  # no "step 1.25" on short runs
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


_STYLES = ["-", "--", ":", "-."]


def _lines(
    rows, keys, path, title, ylabel, label=lambda k: k, logy=False, drawstyle="default"
) -> Path | None:
    drawn = [(k, *_series(rows, k)) for k in keys]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (k, xs, ys) in enumerate(drawn):
        # Dashes cycle so that lines which coincide (lm_loss = lm_loss_all without Rho-1,
        # layers with the same top-k) stay visible.
        ax.plot(xs, ys, ls=_STYLES[i % 4], marker="o" if len(xs) < 12 else None, ms=3,
                label=label(k), drawstyle=drawstyle)  # fmt: skip
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ys_all = [v for d in drawn for v in d[2]]
    if logy and min(ys_all) > 0 and max(ys_all) > 20 * min(ys_all):
        ax.set_yscale("log")
    if len(drawn) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss(rows, out: Path) -> Path | None:
    names = {"lm_loss": "lm_loss (tokens trained on)", "lm_loss_all": "lm_loss_all (all tokens)"}
    return _lines(rows, list(names), out / "loss.png", "training loss", "cross-entropy", names.get)


def plot_val_loss(rows, out: Path) -> Path | None:
    ks = _keys(rows, "val_loss")
    return _lines(
        rows, ks, out / "val_loss.png", "validation loss per domain", "cross-entropy",
        lambda k: k.split("/", 1)[1],
    )  # fmt: skip


def plot_lr(rows, out: Path) -> Path | None:
    return _lines(rows, ["lr"], out / "lr.png", "learning rate", "lr")


def plot_grad_norm(rows, out: Path) -> Path | None:
    return _lines(
        rows, ["grad_norm"], out / "grad_norm.png", "gradient norm (before clipping)", "L2 norm",
        logy=True,
    )  # fmt: skip


def plot_throughput(rows, out: Path) -> Path | None:
    xs, tps = _series(rows, "tokens_per_s")
    if not xs:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(xs, tps, color="tab:blue", lw=2.5, label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens / s", title="throughput and model FLOPs utilisation")
    mx, mfu = _series(rows, "mfu")
    if mx:
        ax2 = ax.twinx()
        ax2.plot(mx, [100 * v for v in mfu], color="tab:orange", ls="--", label="MFU")
        ax2.set_ylabel("MFU (%)", color="tab:orange")
    ax.grid(alpha=0.3)
    return _save(fig, out / "throughput.png")


def plot_expert_load(rows, out: Path) -> Path | None:
    """Layers × steps heatmap of max/mean tokens per expert (1 = perfectly balanced)."""
    ks = _keys(rows, "expert_load_max")
    train = [r for r in rows if any(k in r for k in ks)]
    if not ks or not train:
        return None
    grid = np.array([[r.get(k, np.nan) for r in train] for k in ks], dtype=float)
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.5 * len(ks)))
    im = ax.imshow(
        grid, aspect="auto", cmap="magma", interpolation="nearest", vmin=1.0,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(ks) - 0.5, -0.5),
    )  # fmt: skip
    ax.set_yticks(range(len(ks)), [f"layer {k.split('/')[1]}" for k in ks])
    ax.set(xlabel="step", title="expert load per layer: max / mean tokens per expert")
    fig.colorbar(im, ax=ax, label="max / mean")
    return _save(fig, out / "expert_load.png")


def plot_balance(rows, out: Path) -> Path | None:
    """Per layer over time: coefficient of variation of the tokens per expert, entropy of the
    load / log E (1 = even) and the share of experts that got no token (the balance telemetry
    of every logged step)."""
    panels = [
        ("expert_load_cv", "load CV (std / mean)"),
        ("expert_load_entropy", "load entropy / log E"),
        ("expert_idle_frac", "share of idle experts"),
        ("router_entropy", "router entropy / log E"),
    ]
    panels = [(k, t) for k, t in panels if _keys(rows, k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], panels):
        for i, k in enumerate(_keys(rows, prefix)):
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, ls=_STYLES[i % 4], lw=1.2, label=f"layer {k.split('/', 1)[1]}")
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out / "balance.png")


def plot_dropped(rows, out: Path) -> Path | None:
    xs, ys = _series(rows, "dropped_tokens")
    if not xs or not any(ys):  # dropless runs record 0 every step: nothing to draw
        return None
    return _lines(rows, ["dropped_tokens"], out / "dropped_tokens.png", "dropped tokens", "tokens")


def plot_topk(rows, out: Path) -> Path | None:
    ks = _keys(rows, "topk")
    return _lines(
        rows, ks, out / "topk.png", "top-k per layer (progressive sparsification)", "experts / token",
        lambda k: f"layer {k.split('/')[1]}", drawstyle="steps-post",
    )  # fmt: skip


def plot_selected(rows, out: Path) -> Path | None:
    ks = _keys(rows, "selected_frac")
    xs, ys = _series(rows, "selected_frac")
    if not ks and (not xs or all(v == 1.0 for v in ys)):  # plain CLM trains on every token
        return None
    return _lines(
        rows, ks or ["selected_frac"], out / "rho1_selected.png",
        "Rho-1: fraction of tokens selected, per domain", "selected / valid tokens",
        lambda k: k.split("/", 1)[-1],
    )  # fmt: skip


def plot_excess_hist(run_dir: Path, out: Path) -> Path | None:
    """From rho1_selection.json (the Rho-1 callback's whole-run counts, rank 0's tokens)."""
    f = Path(run_dir) / RHO1_SELECTION
    if not f.is_file():
        return None
    doc = json.loads(f.read_text())
    edges, counts = doc.get("excess_hist_edges"), doc.get("counts", {})
    if not edges:
        return None
    nb = len(edges) - 1
    edges = np.asarray(edges, dtype=float)
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    hists = {
        n: [counts.get(f"excess_hist/{n}/{i}", 0.0) for i in range(nb)]
        for n in ("selected", "rejected")
    }
    used = [i for i in range(nb) if hists["selected"][i] or hists["rejected"][i]]
    for name, color in (("selected", "tab:green"), ("rejected", "tab:red")):
        h = hists[name]
        ax.bar(centers, h, width=width, alpha=0.55, color=color, label=f"{name} ({sum(h):,.0f})")
    if used:  # zoom on the occupied bins, one empty bin either side
        ax.set_xlim(edges[max(used[0] - 1, 0)], edges[min(used[-1] + 2, nb)])
    ax.set(
        xlabel="excess loss  L_θ − L_ref  (nats; the outer bins hold the tails)",
        ylabel="tokens", title="Rho-1: excess loss of selected vs rejected tokens (whole run)",
    )  # fmt: skip
    ax.legend()
    return _save(fig, out / "rho1_excess_hist.png")


def plot_expert_share(run_dir: Path, out: Path) -> Path | None:
    """Per layer, experts × logged steps: each expert's share of the layer's tokens times the
    number of experts (1 = its fair share), from expert_load.jsonl (domains summed)."""
    f = Path(run_dir) / EXPERT_LOAD
    if not f.is_file():
        return None
    per_layer: dict[int, list[np.ndarray]] = {}
    steps: list[int] = []
    for line in f.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        steps.append(rec["step"])
        tot: dict[int, np.ndarray] = {}
        for k, v in rec.items():
            if k.startswith("expert_load/"):
                layer = int(k.split("/")[1])
                tot[layer] = tot.get(layer, 0) + np.asarray(v, dtype=float)
        for layer, c in tot.items():
            per_layer.setdefault(layer, []).append(c * len(c) / max(c.sum(), 1.0))
    if not per_layer:
        return None
    layers = sorted(per_layer)
    cols = min(4, len(layers))
    rows_n = -(-len(layers) // cols)
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(2.6 * cols + 1.2, 3.2 * rows_n), squeeze=False, layout="constrained"
    )
    vmax = max(float(np.max(per_layer[li])) for li in layers)
    for ax, li in zip(axes.flat, layers):
        im = ax.imshow(
            np.stack(per_layer[li], axis=1), aspect="auto", cmap="magma", vmin=0, vmax=vmax,
            interpolation="nearest",
        )  # fmt: skip
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_title(f"layer {li}", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes, label="tokens share × experts (1 = fair)")
    fig.suptitle("tokens per expert over time (counted between evaluations)")
    fig.savefig(out / "expert_share.png", dpi=DPI)
    plt.close(fig)
    return out / "expert_share.png"


def plot_mix(rows, out: Path) -> Path | None:
    ks = _keys(rows, "mix_weight")
    return _lines(
        rows, ks, out / "mix_weight.png", "domain mixing weights", "weight",
        lambda k: k.split("/", 1)[1],
    )  # fmt: skip


# Plots the report shows across the whole page width.
WIDE = {"expert_share"}
# (name, caption, function of (rows, plots dir)) in report order.
PLOTS: list[tuple[str, str, Callable]] = [
    ("loss", "Training loss", plot_loss),
    ("val_loss", "Validation loss per domain", plot_val_loss),
    ("lr", "Learning rate", plot_lr),
    ("throughput", "Tokens/s and MFU", plot_throughput),
    ("grad_norm", "Gradient norm", plot_grad_norm),
    ("expert_load", "Expert load per layer over time", plot_expert_load),
    ("balance", "Expert balance per layer: CV, entropies, idle experts", plot_balance),
    ("expert_share", "Tokens per expert over time", None),
    ("dropped_tokens", "Dropped tokens (capacity factor)", plot_dropped),
    ("topk", "Top-k schedule", plot_topk),
    ("rho1_selected", "Rho-1 selected fraction per domain", plot_selected),
    ("rho1_excess_hist", "Rho-1 excess loss, selected vs rejected", None),
    ("mix_weight", "Domain mixing weights", plot_mix),
]


# Plots drawn from other files of the run directory than metrics.jsonl.
RUN_DIR_PLOTS = {"rho1_excess_hist": plot_excess_hist, "expert_share": plot_expert_share}


def plot_run(run_dir: str | Path) -> dict[str, Path | None]:
    """Every plot of the run under RUN_DIR/plots/: name → path (None: not recorded)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written: dict[str, Path | None] = {}
    for name, _caption, fn in PLOTS:
        stale = out / f"{name}.png"
        if stale.is_file():
            stale.unlink()  # a plot from an earlier report must not outlive its data
        written[name] = RUN_DIR_PLOTS[name](run_dir, out) if fn is None else fn(rows, out)
    return written
