"""RegMix-style pilot search (Liu et al. 2024): small proxies on random mixtures → a regression
from mixture to validation loss → the mixture it predicts best.

1. ``num_proxies`` mixtures are drawn from a Dirichlet around the natural distribution (the
   base recipe's ``data.domains`` weights), ``α = c·K·natural`` with the concentration ``c``
   log-uniform in [0.1, 1] per proxy, so some mixtures stay near natural and some are peaked.
2. Each proxy is this trainer on the base recipe with the proxy overrides (a tiny preset, few
   steps), the mixture as its static weights; its target is the mean validation loss over the
   target domains at the end. Several proxies run at a time (``parallel``, each with
   ``cores // parallel`` threads), with a progress bar. Every finished proxy is appended to
   ``proxies.jsonl``: a killed search continues where it stopped.
3. A regression from mixture to target loss: ``quadratic`` (ridge on degree-2 polynomial
   features: the smallest model with an interior optimum), ``linear`` (ordinary least squares,
   RegMix's linear variant) or ``gbm`` (scikit-learn's histogram gradient boosting, the
   LightGBM algorithm RegMix uses). Its quality is shown by K-fold predictions (never the fit
   on the same points): ``plots/regmix_fit.png`` and the rank correlation in ``regmix.json``.
4. The proposal is RegMix's: the mean of the ``top_k`` best-predicted of many candidate
   mixtures from the same prior; written as a config fragment ``proposed.yaml``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures
from tqdm.auto import tqdm

from sigma_moe.config import load_config, parse_overrides
from sigma_moe.data.dataset import domain_token_counts
from sigma_moe.train.callbacks import StageInterrupted

# A proxy: the base recipe shrunk to the test preset and 120 steps. Measured here (2-core CPU,
# test-tiny, 8 × 64 tokens a step, 1 thread): ~0.2 s a step + ~15 s start-up, so 48 proxies two
# at a time take about 24 × 40 s ≈ 16 min, inside the 30-minute budget.
DEFAULT_PROXY_SETS = [
    "model.preset=test-tiny",
    "data.seq_len=64",
    "data.val_samples_per_domain=16",
    "train.max_steps=120",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "train.lr=3.0e-3",
    "train.warmup_steps=10",
    "train.eval_every=120",
    "train.log_every=20",
    "checkpoint.every=100000",
    "checkpoint.keep_last=1",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]

TrainFn = Callable[[np.ndarray, int, Path], dict[str, float]]


@dataclass
class SearchSpec:
    """What fixes a search (stored in ``search.json``; a resumed search must match it)."""

    config: str
    domains: list[str]
    natural: list[float]
    targets: list[str]
    num_proxies: int = 48
    seed: int = 0
    proxy_sets: list[str] = field(default_factory=lambda: list(DEFAULT_PROXY_SETS))


def sample_mixtures(natural: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, K] mixtures from a Dirichlet around ``natural`` (see the module doc)."""
    K = natural.shape[0]
    c = np.exp(rng.uniform(np.log(0.1), 0.0, size=n))
    alpha = np.maximum(c[:, None] * K * natural[None, :], 1e-3)
    return np.stack([rng.dirichlet(a) for a in alpha])


def make_model(kind: str):
    if kind == "quadratic":
        return make_pipeline(PolynomialFeatures(2, include_bias=False), Ridge(alpha=1e-3))
    if kind == "linear":
        return LinearRegression()
    if kind == "gbm":
        return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, min_samples_leaf=3)
    raise ValueError(f"--model must be quadratic, linear or gbm, got {kind!r}")


def cross_val_predictions(kind: str, X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    folds = KFold(n_splits=min(5, len(y)), shuffle=True, random_state=seed)
    return cross_val_predict(make_model(kind), X, y, cv=folds)


def propose(
    model, natural: np.ndarray, rng: np.random.Generator, n_candidates=20000, top_k=100
) -> tuple[np.ndarray, float]:
    """RegMix's proposal: the mean of the top_k best-predicted candidate mixtures."""
    cand = sample_mixtures(natural, n_candidates, rng)
    pred = model.predict(cand)
    best = cand[np.argsort(pred)[:top_k]].mean(axis=0)
    best = best / best.sum()
    return best, float(model.predict(best[None])[0])


def subprocess_train_fn(spec: SearchSpec, threads: int) -> TrainFn:
    """A proxy as ``python -m sigma_moe train`` in its own process (its own thread budget)."""
    base = load_config(spec.config, spec.proxy_sets)

    def train(mix: np.ndarray, i: int, folder: Path) -> dict[str, float]:
        cfg = base.to_dict()
        for d, w in zip(cfg["data"]["domains"], mix):
            d["weight"] = float(w)
        shutil.rmtree(folder, ignore_errors=True)  # a proxy killed halfway starts again
        folder.mkdir(parents=True)
        (folder / "proxy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
        cmd = [sys.executable, "-m", "sigma_moe", "train", str(folder / "proxy.yaml")]
        r = subprocess.run(
            [*cmd, "--out", str(folder / "run")],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=_die_with_parent,
        )
        if r.returncode != 0:
            raise RuntimeError(f"proxy {i} failed (exit {r.returncode}): {r.stderr[-1500:]}")
        summary = json.loads((folder / "run" / "summary.json").read_text())
        if not summary.get("complete", True):  # Ctrl-C / SIGTERM: the proxy saved and stopped
            raise StageInterrupted(
                f"proxy {i} stopped ({summary.get('stopped_by')}) at step {summary.get('steps')}"
                f" of {summary.get('max_steps')}: the search stopped and its numbers are not "
                "used; run the same mix-search command again to continue"
            )
        last = summary["last_eval"]
        return {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}

    return train


def _die_with_parent() -> None:
    """A proxy gets SIGTERM when the search process dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed search leaves no proxies running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _load_done(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            done[int(r["proxy"])] = r
    return done


def _check_spec(out: Path, spec: SearchSpec) -> None:
    f = out / "search.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != asdict(spec):
            diff = [k for k in old if old.get(k) != asdict(spec).get(k)]
            raise ValueError(
                f"{out} holds a search with other settings ({', '.join(diff)}); "
                "use another --out or the same arguments to continue it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(asdict(spec), indent=1))


def run_proxies(
    spec: SearchSpec, out: Path, train_fn: TrainFn, parallel: int = 1, progress: bool = True
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Train every proxy not in ``proxies.jsonl`` yet; returns (mixtures, per-domain losses)."""
    _check_spec(out, spec)
    mixes = sample_mixtures(
        np.asarray(spec.natural), spec.num_proxies, np.random.default_rng(spec.seed)
    )
    log = out / "proxies.jsonl"
    done = _load_done(log)
    todo = [i for i in range(spec.num_proxies) if i not in done]
    bar = tqdm(total=spec.num_proxies, initial=len(done), desc="proxies", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futs = {pool.submit(train_fn, mixes[i], i, out / "proxies" / f"{i:03d}"): i for i in todo}
        for fut in as_completed(futs):
            i = futs[fut]
            rec = {"proxy": i, "mixture": mixes[i].tolist(), "val_loss": fut.result()}
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done[i] = rec
            bar.update(1)
    bar.close()
    return mixes, [done[i]["val_loss"] for i in range(spec.num_proxies)]


def fit_and_propose(
    spec: SearchSpec, mixes: np.ndarray, losses: list[dict[str, float]], kind: str = "quadratic"
) -> dict[str, Any]:
    """Fit the regression on the target loss, propose a mixture; the numbers for the report."""
    y = np.array([np.mean([lv[t] for t in spec.targets]) for lv in losses])
    cv = cross_val_predictions(kind, mixes, y, spec.seed)
    model = make_model(kind).fit(mixes, y)
    natural = np.asarray(spec.natural)
    best, pred_best = propose(model, natural, np.random.default_rng(spec.seed + 1))
    K = len(spec.domains)
    return {
        "model": kind,
        "targets": spec.targets,
        "measured": y.tolist(),
        "cv_predicted": cv.tolist(),
        "cv_spearman": float(spearmanr(cv, y).statistic),
        "cv_mae": float(np.abs(cv - y).mean()),
        "proposed": dict(zip(spec.domains, best.tolist())),
        "predicted_proposed": pred_best,
        "predicted_uniform": float(model.predict(np.full((1, K), 1.0 / K))[0]),
        "predicted_natural": float(model.predict(natural[None])[0]),
        "best_proxy": dict(zip(spec.domains, mixes[int(np.argmin(y))].tolist())),
        "best_proxy_loss": float(y.min()),
    }


def plot_fit(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = np.array(res["measured"]), np.array(res["cv_predicted"])
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.scatter(y, p, s=14, alpha=0.8, label="proxies (5-fold predictions)")
    lo, hi = min(y.min(), p.min()), max(y.max(), p.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.axhline(res["predicted_proposed"], color="C3", lw=0.8, label="predicted, proposed mix")
    ax.set_xlabel("measured target val loss")
    ax.set_ylabel("predicted target val loss")
    ax.set_title(
        f"RegMix {res['model']}: Spearman {res['cv_spearman']:.2f}, MAE {res['cv_mae']:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(spec: SearchSpec, out: Path, res: dict[str, Any], base_domains) -> Path:
    (out / "regmix.json").write_text(json.dumps(res, indent=1))
    doms = []
    for d in base_domains:
        dd = {k: v for k, v in asdict(d).items()}
        dd["weight"] = round(float(res["proposed"][d.name]), 6)
        doms.append(dd)
    frag = out / "proposed.yaml"
    head = f"# RegMix proposal ({len(res['measured'])} proxies, targets {spec.targets})\n"
    frag.write_text(head + yaml.safe_dump({"data": {"domains": doms}}, sort_keys=False))
    plot_fit(res, out / "plots" / "regmix_fit.png")
    return frag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sigma-moe mix-search", description=__doc__.split("\n\n")[0].strip()
    )
    p.add_argument("config", help="base recipe (its data.domains are mixed)")
    p.add_argument("--out", default="runs/regmix", help="search folder (resumable)")
    p.add_argument("--proxies", type=int, default=48, help="number of proxy runs (default 48)")
    p.add_argument("--parallel", type=int, default=2, help="proxies at a time (default 2)")
    p.add_argument("--targets", help="comma-separated target domains (default: all)")
    p.add_argument("--model", default="quadratic", choices=["quadratic", "linear", "gbm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prior",
        default="tokens",
        choices=["tokens", "config"],
        help="centre of the Dirichlet: the domains' token shares (RegMix) or the recipe weights",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra proxy override"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--fit-partial",
        action="store_true",
        help="train nothing: fit on the proxies finished so far (an unfinished search)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    proxy_sets = DEFAULT_PROXY_SETS + list(a.set)
    parse_overrides(proxy_sets)
    base = load_config(a.config, proxy_sets)  # a bad recipe or override fails here
    names = [d.name for d in base.data.domains]
    targets = a.targets.split(",") if a.targets else names
    bad = [t for t in targets if t not in names]
    if bad:
        raise ValueError(f"--targets {bad} are not domains of {a.config} ({names})")
    if a.proxies < 4:
        raise ValueError(f"--proxies must be >= 4 for a regression, got {a.proxies}")
    if a.prior == "tokens":
        w = np.array(domain_token_counts(base.data.domains, base.data.tokenizer), dtype=float)
    else:
        w = np.array([d.weight for d in base.data.domains])
    spec = SearchSpec(
        str(a.config), names, (w / w.sum()).tolist(), targets, a.proxies, a.seed, proxy_sets
    )
    out = Path(a.out)
    threads = max(1, (os.cpu_count() or 1) // max(1, a.parallel))
    if a.fit_partial:
        _check_spec(out, spec)
        done = _load_done(out / "proxies.jsonl")
        if len(done) < 4:
            raise ValueError(f"--fit-partial: {out} has {len(done)} finished proxies, need >= 4")
        mixes = np.array([r["mixture"] for r in done.values()])
        losses = [r["val_loss"] for r in done.values()]
    else:
        mixes, losses = run_proxies(
            spec, out, subprocess_train_fn(spec, threads), a.parallel, not a.no_progress
        )
    res = fit_and_propose(spec, mixes, losses, a.model)
    frag = write_outputs(spec, out, res, base.data.domains)
    print(
        f"proposed mixture {json.dumps({k: round(v, 3) for k, v in res['proposed'].items()})}\n"
        f"predicted target loss {res['predicted_proposed']:.4f} (uniform "
        f"{res['predicted_uniform']:.4f}, natural {res['predicted_natural']:.4f}); "
        f"5-fold Spearman {res['cv_spearman']:.2f}\nwrote {frag} and {out / 'plots'}"
    )
    return 0
