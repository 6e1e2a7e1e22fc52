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
import copy
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures
from tqdm.auto import tqdm

from sigma_moe import _threads
from sigma_moe.config import config_from_dict, load_config, parse_overrides
from sigma_moe.data.dataset import domain_token_counts
from sigma_moe.train import loop
from sigma_moe.train.callbacks import StageInterrupted
from sigma_moe.train.engine import DIST_ENV_KEYS

# A proxy: the base recipe shrunk to the test preset and 120 steps, plain causal LM (RegMix's
# proxies; a Rho-1 recipe's selection would need its reference in every proxy). Measured here
# (quiet 2-core CPU, test-tiny, 8 × 64 tokens a step, 1 thread): 16.8 s a proxy in a warm
# ProxyPool worker, so 48 proxies two at a time take about 24 × 17 s ≈ 7 min plus the workers'
# start-up, inside the 30-minute budget with room for a loaded machine.
DEFAULT_PROXY_SETS = [
    "rho1.mode=none",
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


class ProxyPool:
    """Proxies trained by ``parallel`` long-lived worker processes, each with ``threads`` torch
    threads, each training one proxy after another in-process (``train_proxy``).

    Why not one ``sigma-moe train`` process per proxy: measured here (quiet 2-core CPU, the
    default proxy, 1 thread) a fresh process took 33.5 s a proxy, of which ~13 s were imports
    (megatron.core alone ~10 s), against 16.8 s for the second proxy of a warm process; the
    losses are bitwise the same (6.454138044219771 both ways). Workers are spawned (the parent
    has torch loaded) and get SIGTERM when the search process dies (``_die_with_parent``), so a
    killed search leaves no proxies running; a proxy cut short saves and stops like any run.
    """

    def __init__(self, spec: SearchSpec, threads: int, parallel: int):
        self.base = load_config(spec.config, spec.proxy_sets).to_dict()
        ctx = multiprocessing.get_context("spawn")
        saved = os.environ.get("OMP_NUM_THREADS")
        saved_wait = {k: os.environ.get(k) for k in _threads.SHORT}
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
        if threads * max(1, parallel) > _threads.cores() and not _threads.user_set():
            os.environ.update(_threads.SHORT)  # siblings share the cores: no long spins
        try:
            self.pool = ProcessPoolExecutor(
                max(1, parallel), ctx, initializer=_worker_init, initargs=(threads,)
            )
            # start the workers now, inside the environment above
            list(self.pool.map(_worker_ready, range(max(1, parallel))))
        finally:
            for k, v in {"OMP_NUM_THREADS": saved, **saved_wait}.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def __call__(self, mix: np.ndarray, i: int, folder: Path) -> dict[str, float]:
        cfg = copy.deepcopy(self.base)
        for d, w in zip(cfg["data"]["domains"], mix):
            d["weight"] = float(w)
        return self.pool.submit(train_proxy, cfg, i, str(folder)).result()

    def __enter__(self) -> ProxyPool:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # stop the running proxies now (each saves and stops)
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the search process dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed search leaves no proxies running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _worker_init(threads: int) -> None:
    _die_with_parent()
    # each proxy is a 1-process run with a rendezvous of its own: a MASTER_PORT inherited from
    # the parent (held by the parent's process group after an in-process training, or the
    # launcher's) made CI's proxies fail with EADDRINUSE
    for k in DIST_ENV_KEYS:
        os.environ.pop(k, None)
    torch.set_num_threads(threads)
    os.environ["WANDB_MODE"] = "disabled"


def _worker_ready(_: int) -> int:
    return os.getpid()


def train_proxy(cfg_dict: dict, i: int, folder: str) -> dict[str, float]:
    """One proxy (in a ``ProxyPool`` worker): its static mixture trained by this trainer into
    ``folder/run``; its output goes to ``folder/train.log``. Returns the final per-domain
    validation losses."""
    out = Path(folder)
    shutil.rmtree(out, ignore_errors=True)  # a proxy killed halfway starts again
    out.mkdir(parents=True)
    (out / "proxy.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    with (out / "train.log").open("w") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)  # the worker's own stdout / stderr; results travel by pipe
        os.dup2(log.fileno(), 2)
        try:
            summary = loop.run_training(config_from_dict(cfg_dict), out / "run")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    if not summary.get("complete", True):  # Ctrl-C / SIGTERM: the proxy saved and stopped
        raise StageInterrupted(
            f"proxy {i} stopped ({summary.get('stopped_by')}) at step {summary.get('steps')}"
            f" of {summary.get('max_steps')}: the search stopped and its numbers are not "
            "used; run the same mix-search command again to continue"
        )
    last = summary["last_eval"]
    return {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}


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
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futs = {pool.submit(train_fn, mixes[i], i, out / "proxies" / f"{i:03d}"): i for i in todo}
        for fut in as_completed(futs):
            i = futs[fut]
            rec = {"proxy": i, "mixture": mixes[i].tolist(), "val_loss": fut.result()}
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done[i] = rec
            bar.update(1)
    finally:  # a failure or a kill: the queued proxies never start
        pool.shutdown(wait=False, cancel_futures=True)
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


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _log_timing(out: Path, wall_s: float, parallel: int, threads: int) -> None:
    """One line per search invocation (a resumed search adds its own), for the wall time."""
    rec = {
        "wall_s": round(wall_s, 1),
        "proxies_done": len(_load_done(out / "proxies.jsonl")),
        "parallel": parallel,
        "threads_each": threads,
        "load_avg_end": os.getloadavg()[0],
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with (out / "timing.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


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
    if base.rho1.mode != "none" or base.data.mixing.kind != "static":
        raise ValueError(
            "mix-search proxies are plain static-mixture runs: --set rho1.mode / "
            f"data.mixing.kind cannot change that (got rho1.mode={base.rho1.mode!r}, "
            f"data.mixing.kind={base.data.mixing.kind!r})"
        )
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
        t0 = time.monotonic()
        # SIGTERM ends the search like Ctrl-C: the finished proxies and the time are kept
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            with ProxyPool(spec, threads, a.parallel) as pool:
                mixes, losses = run_proxies(spec, out, pool, a.parallel, not a.no_progress)
        finally:  # a killed (Ctrl-C / SIGTERM) search logs its time too
            _log_timing(out, time.monotonic() - t0, a.parallel, threads)
    res = fit_and_propose(spec, mixes, losses, a.model)
    timing = out / "timing.jsonl"
    res["timing"] = (
        [json.loads(x) for x in timing.read_text().splitlines()] if timing.is_file() else []
    )
    res["wall_s_total"] = sum(t["wall_s"] for t in res["timing"])
    frag = write_outputs(spec, out, res, base.data.domains)
    print(
        f"proposed mixture {json.dumps({k: round(v, 3) for k, v in res['proposed'].items()})}\n"
        f"predicted target loss {res['predicted_proposed']:.4f} (uniform "
        f"{res['predicted_uniform']:.4f}, natural {res['predicted_natural']:.4f}); "
        f"5-fold Spearman {res['cv_spearman']:.2f}; search wall time {res['wall_s_total']:.0f} s"
        f"\nwrote {frag} and {out / 'plots'}"
    )
    return 0
