"""The mixing experiment of docs/mixing.md: at equal steps and seed on the bundled corpus,

- ``uniform``  static, every domain 1/K;
- ``natural``  static, each domain's share of the corpus tokens;
- ``online-doremi``  from natural, the ``natural`` run of the same seed as its reference
  (DoReMi's recipe: the reference is trained on the default mixture, same size and steps);
- ``online-bandit``  EXP3 from uniform;
- ``regmix``  static, the mixture a RegMix search proposed (``--regmix DIR``: its
  ``proposed.yaml``; the arm is skipped without one).

Writes ``OUT/mixing_results.json`` (per arm and seed: average and worst-domain validation loss,
per-domain losses, tokens/s), ``OUT/plots/mix_weights.png`` (the online weight trajectories)
and ``OUT/plots/expert_load_<a>_vs_<b>.png`` (two arms' domain × expert heatmaps side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sigma_moe.config import DomainConfig, RunConfig, load_config
from sigma_moe.data.dataset import domain_token_counts
from sigma_moe.run import run_training
from sigma_moe.train.domain_stats import read_expert_load

ARMS = ["uniform", "natural", "online-doremi", "online-bandit", "regmix"]


def _with_weights(cfg: RunConfig, weights: list[float]) -> RunConfig:
    cfg.data.domains = [
        DomainConfig(d.name, d.path, float(w), d.clean) for d, w in zip(cfg.data.domains, weights)
    ]
    return cfg


def arm_config(
    arm: str, recipe: str, sets: list[str], seed: int, natural, regmix, ref: Path | None
) -> RunConfig:
    cfg = load_config(recipe, [*sets, f"train.seed={seed}"])
    K = len(cfg.data.domains)
    if arm == "uniform":
        return _with_weights(cfg, [1.0 / K] * K)
    if arm == "natural":
        return _with_weights(cfg, natural)
    if arm == "regmix":
        return _with_weights(cfg, [regmix[d.name] for d in cfg.data.domains])
    cfg.data.mixing.kind = arm
    if arm == "online-doremi":
        cfg.rho1.reference = str(ref)
        _with_weights(cfg, natural)
    return cfg.validate()


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def summarise(run: Path) -> dict[str, Any]:
    lines = _metrics(run)
    last = [m for m in lines if "val_loss" in m][-1]
    tps = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    return {
        "val_loss": last["val_loss"],
        "val_loss_worst": max(v for k, v in last.items() if k.startswith("val_loss/")),
        "per_domain": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")},
        "tokens_per_s_median": statistics.median(tps) if tps else None,
    }


def plot_weights(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (arm, run) in zip(axes[0], runs.items()):
        lines = [m for m in _metrics(run) if any(k.startswith("mix_weight/") for k in m)]
        for k in [k for k in lines[0] if k.startswith("mix_weight/")]:
            ax.plot([m["step"] for m in lines], [m[k] for m in lines], label=k.split("/", 1)[1])
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("sampling weight")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_heatmaps(a: tuple[str, Path], b: tuple[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [(name, *read_expert_load(run)) for name, run in (a, b)]
    L = mats[0][2].shape[0]
    fig, axes = plt.subplots(L, 2, figsize=(10, 1.0 + 1.6 * L), squeeze=False, layout="constrained")
    for col, (name, domains, c_LKE) in enumerate(mats):
        share = c_LKE / np.maximum(c_LKE.sum(axis=2, keepdims=True), 1.0)
        for li in range(L):
            ax = axes[li][col]
            im = ax.imshow(share[li], aspect="auto", cmap="viridis", vmin=0, vmax=share.max())
            ax.set_yticks(range(len(domains)), domains, fontsize=7)
            ax.set_title(f"{name}: layer {li}", fontsize=8, loc="left")
    for ax in axes[-1]:
        ax.set_xlabel("expert")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the domain's tokens", shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_mixing_experiment(
    out: Path,
    recipe: str = "configs/mixing-exp.yaml",
    seeds: tuple[int, ...] = (0,),
    regmix_dir: Path | None = None,
    sets: list[str] | None = None,
    arms: list[str] | None = None,
) -> dict[str, Any]:
    sets = list(sets or [])
    base = load_config(recipe, sets)
    tokens = domain_token_counts(base.data.domains, base.data.tokenizer)
    natural = [t / sum(tokens) for t in tokens]
    regmix = None
    if regmix_dir is not None and (Path(regmix_dir) / "proposed.yaml").is_file():
        frag = yaml.safe_load((Path(regmix_dir) / "proposed.yaml").read_text())
        regmix = {d["name"]: d["weight"] for d in frag["data"]["domains"]}
    arms = [a for a in (arms or ARMS) if a != "regmix" or regmix is not None]
    results: dict[str, Any] = {"natural_weights": natural, "regmix_weights": regmix, "arms": {}}
    for seed in seeds:
        for arm in arms:
            run = out / f"seed{seed}" / arm
            ref = out / f"seed{seed}" / "natural" / "checkpoints"
            if not (run / "summary.json").is_file():
                cfg = arm_config(arm, recipe, sets, seed, natural, regmix, ref)
                run_training(cfg, run)
            results["arms"].setdefault(arm, {})[seed] = summarise(run)
    (out / "mixing_results.json").write_text(json.dumps(results, indent=1))
    s0 = out / f"seed{seeds[0]}"
    online = {a: s0 / a for a in arms if a.startswith("online-")}
    if online:
        plot_weights(online, out / "plots" / "mix_weights.png")
    # the heatmaps of the static default next to the most moved mixture that ran
    pair = [a for a in ("natural", "online-doremi", "regmix", "uniform") if a in arms][:2]
    if len(pair) == 2:
        name = f"expert_load_{pair[0]}_vs_{pair[1]}.png"
        plot_heatmaps((pair[0], s0 / pair[0]), (pair[1], s0 / pair[1]), out / "plots" / name)
    print(format_table(results))
    return results


def format_table(res: dict[str, Any]) -> str:
    rows = [
        f"{'arm':<15}{'avg val loss':>14}{'worst domain':>14}{'tok/s':>8}  (mean ± sd over seeds)"
    ]
    for arm, by_seed in res["arms"].items():
        v = [r["val_loss"] for r in by_seed.values()]
        w = [r["val_loss_worst"] for r in by_seed.values()]
        t = [r["tokens_per_s_median"] or 0 for r in by_seed.values()]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        rows.append(
            f"{arm:<15}{statistics.mean(v):>10.4f}±{sd:.3f}{statistics.mean(w):>14.4f}"
            f"{statistics.mean(t):>8.0f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mixing")
    p.add_argument("--recipe", default="configs/mixing-exp.yaml")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--regmix", help="a finished `sigma-moe mix-search` folder")
    p.add_argument("--arms", help=f"comma-separated subset of {ARMS}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    run_mixing_experiment(
        Path(a.out),
        a.recipe,
        tuple(int(s) for s in a.seeds.split(",")),
        Path(a.regmix) if a.regmix else None,
        a.set,
        a.arms.split(",") if a.arms else None,
    )
    return 0
