"""The Rho-1 experiment behind ``scripts/rho1_demo.py`` and ``sigma-moe demo``.

Does selective language modeling learn clean text better from a noisy mix, and what does the live
scorer cost?

1. Train the reference model (``configs/ref-demo.yaml``) on the clean domains (prose, code, math).
2. Train the target (``configs/demo-cpu.yaml``) on a mix where web noise is a large share
   (default 50% of samples), for the same steps and tokens:
   - CLM: ``rho1.mode=none``;
   - SLM: ``rho1.mode=excess`` with the live scorer side process (``rho1.scorer=process``);
   - optionally SLM again from a store prefilled offline (``rho1.scorer=prefilled``; for the
     throughput comparison — the selection, hence the training, is the same).
3. Evaluate the clean domains' held-out loss, the selection rate of noise vs clean tokens, the
   whole-run throughput, and colour a few validation passages by selected / rejected tokens.

Writes ``out/rho1_results.json`` (``clm_clean_val_loss``, ``slm_clean_val_loss``,
``noise_selected_frac``, ``clean_selected_frac``, throughput, …), ``out/rho1_tokens.html``,
``out/rho1_tokens.png`` and ``out/rho1_table.md``.

A stage stopped by Ctrl-C / SIGTERM (or that fails) stops the experiment after its checkpoint:
no ``rho1_results.json`` is written from an unfinished run (a stage's step-0 loss once became
``slm_prefilled_clean_val_loss``, issue 15); ``resume="auto"`` continues the stages.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sigma_moe.bench.common import rotated_rounds
from sigma_moe.config import load_config
from sigma_moe.data.batch import IGNORE_INDEX, masked_labels
from sigma_moe.data.dataset import build_val_datasets, collate
from sigma_moe.data.tokenizer import BUNDLED_VOCAB_SIZE, load_tokenizer
from sigma_moe.model.inference import load_model_for_inference
from sigma_moe.rho1.compare import compare_stores
from sigma_moe.rho1.reference import load_reference, reference_dtype, score_batch
from sigma_moe.rho1.score_cli import prefill
from sigma_moe.rho1.selection import token_weights
from sigma_moe.run import run_training
from sigma_moe.train.callbacks import require_complete

from . import config_path

DEFAULT_STEPS = 100
DEFAULT_REF_STEPS = 200


class _Timer:
    """Wall time of the training steps (after start-up, incl. scorer waits and eval)."""

    def __init__(self):
        self.t_start = None
        self.t_end = None
        self.step_times: list[float] = []
        self.tokens = 0

    def on_train_start(self, trainer):
        self.t_start = time.perf_counter()

    def on_step_end(self, trainer, m):
        self.step_times.append(float(m.get("step_time_s", 0.0)))
        self.tokens = int(m.get("tokens", 0))
        self.t_end = time.perf_counter()


def _train(cfg, out: Path, label: str, resume: str = "none", hint: str = "") -> dict[str, Any]:
    timer = _Timer()
    print(f"\n=== {label}: {out} ===", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # the run assembly adds the Rho-1 objective when cfg.rho1.mode selects tokens
    summary = run_training(cfg, out, resume=resume, extra_callbacks=[timer])
    wall = time.perf_counter() - t0
    require_complete(summary, label, out, hint or "rerun the same command with resume='auto'")
    steps_s = sum(timer.step_times)
    return {
        "summary": summary,
        "wall_s": wall,
        "train_steps_s": steps_s,
        "tokens": timer.tokens,
        # tokens / Σ step time: the steps' own time incl. scorer waits and CPU contention
        "tokens_per_s": timer.tokens / steps_s if steps_s else None,
        # tokens / wall time of the whole run_training call (start-up, evals, checkpoints incl.)
        "tokens_per_s_wall": timer.tokens / wall if wall else None,
    }


def _clean_val(summary: dict[str, Any]) -> float | None:
    last = summary.get("last_eval") or {}
    return last.get("clean_val_loss")


def _sets(args) -> list[str]:
    noise = args.noise_share
    clean = (1 - noise) / 3
    return [
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"checkpoint.every={args.steps}",
        "checkpoint.keep_last=1",
        f"train.seed={args.seed}",
        "data.domains="
        + json.dumps(
            [
                {"name": "prose", "path": "bundled", "weight": clean, "clean": True},
                {"name": "code", "path": "bundled", "weight": clean, "clean": True},
                {"name": "math", "path": "bundled", "weight": clean, "clean": True},
                {"name": "webnoise", "path": "bundled", "weight": noise, "clean": False},
            ]
        ),
        f"logging.progress={'true' if args.progress else 'false'}",
        "logging.wandb_mode=disabled",
    ]


# --------------------------------------------------------------------------- visualisation


def _passages(target_ckpt: Path, ref_path: Path, cfg, ratio: float, n_per_domain: int = 2):
    """Validation passages of each domain scored by the final SLM model and the reference;
    selection with one threshold over the whole set (as a global batch would)."""
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _, _ = load_model_for_inference(target_ckpt)
    ref = load_reference(ref_path, tok, dtype=reference_dtype(cfg))
    val = build_val_datasets(cfg.data.domains, cfg.data.seq_len, tok, max_samples_per_domain=8)
    samples, names = [], []
    for name, ds in val.items():
        for i in range(min(n_per_domain, len(ds))):
            samples.append(ds[i])
            names.append(name)
    b = collate(samples)
    labels = masked_labels(b)
    with torch.no_grad():
        ce = score_batch(model, b["input_ids"], labels)
        rl = score_batch(ref, b["input_ids"], labels)
    valid = labels != IGNORE_INDEX
    w = token_weights(ce, rl, valid, mode="excess", ratio=ratio)
    out = []
    for r in range(len(samples)):
        # token j's label is input j+1: colour the *predicted* token (labels[r, j])
        toks = []
        for j in range(labels.shape[1]):
            if not valid[r, j]:
                continue
            toks.append(
                {
                    "text": tok.decode([int(labels[r, j])]),
                    "selected": bool(w[r, j] == 1),
                    "excess": float(ce[r, j] - rl[r, j]),
                    "ce": float(ce[r, j]),
                    "ref": float(rl[r, j]),
                }
            )
        out.append({"domain": names[r], "tokens": toks})
    return out


def _write_html(passages, path: Path, ratio: float) -> None:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>Rho-1 token selection</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".p{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.6em;"
        "margin-bottom:1.2em;line-height:1.5}.s{background:#b7eb8f}.r{background:#ffccc7;"
        "color:#888}h3{margin-bottom:.2em}</style>",
        "<h1>Rho-1 token selection on validation passages</h1>",
        f"<p>Final SLM model vs the clean-domain reference; score = excess loss (model CE − "
        f"reference CE); top {ratio:.0%} of the tokens of all passages kept (one threshold). "
        "<span class='s'>selected</span> <span class='r'>rejected</span>. Hover a token for "
        "its losses.</p>",
    ]
    for p in passages:
        n = len(p["tokens"])
        k = sum(t["selected"] for t in p["tokens"])
        parts.append(
            f"<h3>{html.escape(p['domain'])} — {k}/{n} tokens selected</h3><div class='p'>"
        )
        for t in p["tokens"]:
            cls = "s" if t["selected"] else "r"
            tip = f"excess {t['excess']:.2f} = CE {t['ce']:.2f} − ref {t['ref']:.2f}"
            parts.append(f"<span class='{cls}' title='{tip}'>{html.escape(t['text'])}</span>")
        parts.append("</div>")
    path.write_text("".join(parts), encoding="utf-8")


def _write_png(passages, path: Path, max_tokens: int = 160) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, cw = 170, 0.0056  # characters per line, monospace char width (axes fraction)
    lines_total = 0
    layout = []
    for p in passages:
        x, lines, cells = 0, 1, []
        for t in p["tokens"][:max_tokens]:
            s = t["text"].replace("\n", "⏎").replace("\t", " ")
            if x + len(s) > cols:
                x, lines = 0, lines + 1
            cells.append((x, lines - 1, s, t["selected"]))
            x += len(s)
        layout.append((p["domain"], cells, lines))
        lines_total += lines + 2
    fig_h = max(4.0, lines_total * 0.19)
    fig = plt.figure(figsize=(13, fig_h))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    lh = 1.0 / (lines_total + 1)
    y = 1.0 - lh
    for domain, cells, lines in layout:
        ax.text(0.01, y, f"{domain}", fontsize=9, fontweight="bold", va="top", family="sans-serif")
        y -= lh
        for cx, cy, s, sel in cells:
            ax.text(
                0.01 + cx * cw,
                y - cy * lh,
                s,
                fontsize=8,
                family="monospace",
                va="top",
                color="black" if sel else "#999999",
                bbox=dict(
                    boxstyle="square,pad=0.05",
                    fc="#b7eb8f" if sel else "#ffccc7",
                    ec="none",
                ),
            )
        y -= (lines + 1) * lh
    fig.savefig(path, dpi=110)
    plt.close(fig)
    try:  # a 32-colour palette keeps the figure ~4x smaller (it has five colours)
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=32).save(path, optimize=True)
    except Exception:
        pass


# --------------------------------------------------------------------------- main


def run_rho1_experiment(
    out: str | os.PathLike,
    steps: int | None = None,
    *,
    ref_steps: int | None = None,
    noise_share: float = 0.5,
    select_ratio: float = 0.6,
    seed: int = 1234,
    prefilled: bool = False,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
    resume: str = "none",
    resume_hint: str | None = None,
) -> dict[str, Any]:
    """Run the experiment into ``out``; returns the results dict (also ``out/rho1_results.json``).

    ``steps``: target steps per run (default 100); ``ref_steps``: reference steps (default 200);
    ``prefilled``: also train from a store prefilled offline (for the throughput comparison).
    ``resume``: "auto" continues every stage from its newest checkpoint. A stage that stops
    early raises ``StageInterrupted`` (``resume_hint`` is the command it tells to run).
    """
    args = argparse.Namespace(
        out=Path(out),
        steps=int(steps or DEFAULT_STEPS),
        ref_steps=int(ref_steps or DEFAULT_REF_STEPS),
        noise_share=float(noise_share),
        select_ratio=float(select_ratio),
        seed=int(seed),
        no_prefilled=not prefilled,
        reference=Path(reference) if reference else None,
        progress=bool(progress),
    )
    if not 0 < args.noise_share < 1:
        raise ValueError(f"noise_share must be in (0, 1), got {args.noise_share}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    hint = resume_hint or "the same command with --resume auto"

    def train(cfg, run: Path, label: str) -> dict[str, Any]:
        return _train(cfg, run, label, resume, hint)

    t_all = time.perf_counter()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.reference is None:  # 1. reference on clean domains
        ref_path, results["reference"] = _train_reference(args, out, train)
    else:
        ref_path = args.reference
    slm_cfg, runs = _train_targets(args, out, ref_path, train)  # 2. CLM, SLM (live, prefilled)
    results.update(_results(args, out, slm_cfg, **runs))  # 3. results
    results.update(_colour_tokens(args, out, ref_path, slm_cfg))  # 4. token colouring
    results["total_wall_s"] = time.perf_counter() - t_all
    (out / "rho1_results.json").write_text(json.dumps(results, indent=1, default=str))
    table = format_table(results)
    (out / "rho1_table.md").write_text(table)
    print(table, file=sys.stderr)
    return results


def _train_reference(args, out: Path, train) -> tuple[Path, dict[str, Any]]:
    """Step 1: the reference on the clean domains; returns its checkpoints and its results."""
    ref_cfg = load_config(
        config_path("ref-demo.yaml"),
        [
            f"train.max_steps={args.ref_steps}",
            f"train.eval_every={args.ref_steps}",
            f"checkpoint.every={args.ref_steps}",
            f"logging.progress={'true' if args.progress else 'false'}",
        ],
    )
    ref_run = train(ref_cfg, out / "ref", "reference (clean domains)")
    return out / "ref" / "checkpoints", {
        "config": "configs/ref-demo.yaml",
        "steps": args.ref_steps,
        "clean_val_loss": _clean_val(ref_run["summary"]),
        "last_eval": ref_run["summary"].get("last_eval"),
    }


def _train_targets(args, out: Path, ref_path, train):
    """Step 2: the target as CLM, as SLM with the live scorer and (optionally) as SLM from a
    store prefilled offline; returns the SLM config and the three runs (``pre`` may be None)."""
    base = _sets(args)
    cfg_file = config_path("demo-cpu.yaml")
    clm_cfg = load_config(cfg_file, base + ["rho1.mode=none"])
    clm = train(clm_cfg, out / "clm", "target CLM (rho1.mode=none)")
    slm_sets = base + [
        "rho1.mode=excess",
        f"rho1.select_ratio={args.select_ratio}",
        f"rho1.reference={ref_path}",
    ]
    slm_cfg = load_config(
        cfg_file, slm_sets + ["rho1.scorer=process", f"rho1.store={out / 'store-live'}"]
    )
    slm = train(slm_cfg, out / "slm", "target SLM (rho1.mode=excess, live scorer)")
    pre = None
    if not args.no_prefilled:
        pre_cfg = load_config(
            cfg_file, slm_sets + ["rho1.scorer=prefilled", f"rho1.store={out / 'store-prefilled'}"]
        )
        print("\n=== prefilling the reference-loss store offline ===", file=sys.stderr, flush=True)
        fill = prefill(pre_cfg, str(ref_path), str(out / "store-prefilled"), progress=args.progress)
        pre = train(pre_cfg, out / "slm-prefilled", "target SLM (prefilled store)")
        pre["prefill"] = fill
    return slm_cfg, {"clm": clm, "slm": slm, "pre": pre}


def _selected_frac(out: Path, slm_cfg):
    """Selected fraction of the SLM run's tokens per set of domains (from its selection counts)."""
    sel = json.loads((out / "slm" / "rho1_selection.json").read_text())
    counts, names = sel["counts"], sel["domain_names"]

    def frac(domains):
        ids = [str(names.index(n)) for n in domains]
        s = sum(counts.get(f"n_selected/{i}", 0.0) for i in ids)
        v = sum(counts.get(f"n_valid/{i}", 0.0) for i in ids)
        return s / v if v else None

    return sel, names, frac


def _results(args, out: Path, slm_cfg, clm, slm, pre) -> dict[str, Any]:
    """Step 3: losses, selection rates, throughput and model sizes of the runs."""
    sel, names, frac = _selected_frac(out, slm_cfg)
    clean_names = [d.name for d in slm_cfg.data.domains if d.clean]
    noise_names = [d.name for d in slm_cfg.data.domains if not d.clean]
    tp = {
        "none": clm["tokens_per_s"],
        "live_scorer": slm["tokens_per_s"],
        "prefilled": pre["tokens_per_s"] if pre else None,
    }
    # active parameters at the bundled tokenizer's vocabulary size (the demo recipes use it)
    tgt_active = slm_cfg.build_model(BUNDLED_VOCAB_SIZE).num_active_params()
    ref_cfg = load_config(config_path("ref-demo.yaml"))
    ref_active = ref_cfg.build_model(BUNDLED_VOCAB_SIZE)
    return {
        "clm_clean_val_loss": _clean_val(clm["summary"]),
        "slm_clean_val_loss": _clean_val(slm["summary"]),
        "slm_prefilled_clean_val_loss": _clean_val(pre["summary"]) if pre else None,
        "clm_last_eval": clm["summary"].get("last_eval"),
        "slm_last_eval": slm["summary"].get("last_eval"),
        "noise_selected_frac": frac(noise_names),
        "clean_selected_frac": frac(clean_names),
        "selected_frac_by_domain": {n: frac([n]) for n in names},
        "select_ratio": args.select_ratio,
        "noise_share": args.noise_share,
        "steps": args.steps,
        "tokens_per_run": slm["tokens"],
        "tokens_per_s": tp,
        "tokens_per_s_wall": {
            "none": clm["tokens_per_s_wall"],
            "live_scorer": slm["tokens_per_s_wall"],
            "prefilled": pre["tokens_per_s_wall"] if pre else None,
        },
        "throughput_ratio_live_vs_none": tp["live_scorer"] / tp["none"],
        "throughput_ratio_prefilled_vs_none": (tp["prefilled"] / tp["none"]) if pre else None,
        "throughput_ratio_live_vs_prefilled": (tp["live_scorer"] / tp["prefilled"])
        if pre
        else None,
        "scorer": sel.get("scorer"),
        "prefill": pre["prefill"] if pre else None,
        "target_active_params": tgt_active,
        "reference_active_params": ref_active.num_active_params(),
        "cpu_count": os.cpu_count(),
    }


def _colour_tokens(args, out: Path, ref_path, slm_cfg) -> dict[str, Any]:
    """Step 4: a few validation passages coloured by selected / rejected tokens (HTML, PNG)."""
    try:
        passages = _passages(out / "slm" / "checkpoints", ref_path, slm_cfg, args.select_ratio)
        _write_html(passages, out / "rho1_tokens.html", args.select_ratio)
        _write_png(passages, out / "rho1_tokens.png")
        return {
            "passages": [
                {
                    "domain": p["domain"],
                    "selected_frac": sum(t["selected"] for t in p["tokens"])
                    / max(1, len(p["tokens"])),
                }
                for p in passages
            ]
        }
    except Exception as e:  # the figures must not lose the numbers
        print(f"[rho1_demo] token colouring skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return {}


_RUN_KEYS = ("tokens", "train_steps_s", "wall_s", "tokens_per_s", "tokens_per_s_wall")


def _throughput_variants(scorer_nice: Sequence[int], bf16: bool) -> dict[str, list[str]]:
    """Per scored variant, its overrides on top of the live side process's (each run gets a
    fresh store: the scorer must really keep pace)."""
    variants = {
        "live_scorer": [],
        **{f"live_scorer_nice{n}": [f"rho1.scorer_nice={n}"] for n in scorer_nice},
        "inline": ["rho1.scorer=inline"],  # scored on demand: a fresh store per repeat too
    }
    if bf16:
        variants["live_scorer_bf16"] = ["rho1.reference_dtype=bf16"]
        variants["inline_bf16"] = ["rho1.scorer=inline", "rho1.reference_dtype=bf16"]
    return variants


def _throughput_ratios(tp: dict[str, float]) -> dict[str, float]:
    ratios = {
        "throughput_ratio_live_vs_prefilled": tp["live_scorer"] / tp["prefilled"],
        "throughput_ratio_prefilled_vs_none": tp["prefilled"] / tp["none"],
    }
    for name in tp:
        if name.startswith(("live_scorer", "inline")):
            short = name.replace("live_scorer", "live")
            ratios[f"throughput_ratio_{short}_vs_none"] = tp[name] / tp["none"]
    return ratios


def measure_throughput(
    out: str | os.PathLike,
    reference: str | os.PathLike,
    steps: int = 40,
    repeats: int = 2,
    noise_share: float = 0.5,
    select_ratio: float = 0.6,
    seed: int = 1234,
    scorer_nice: Sequence[int] = (),
    bf16: bool = False,
) -> dict[str, Any]:
    """Whole-run tokens/s of mode=none vs excess with the live scorer side process vs excess
    scored inline (the trainer's own threads score on demand) vs excess from a prefilled store,
    interleaved, each round's order rotated by one (``rotated_rounds``), so a shared machine's
    load drifts into every variant alike. ``scorer_nice``: more live variants,
    ``live_scorer_nice<N>`` with ``rho1.scorer_nice=N`` (``live_scorer`` keeps the recipe's).
    ``bf16``: also ``live_scorer_bf16`` and ``inline_bf16`` (``rho1.reference_dtype=bf16``),
    and how far the bf16 side process's store is from the fp32 one (``compare_stores``).
    Figures: pooled over the runs (Σ tokens / Σ step time) and the median run's
    (``tokens_per_s_median``, ``ratios_of_medians``). Writes ``out/rho1_throughput.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        steps=steps, noise_share=noise_share, seed=seed, progress=False, select_ratio=select_ratio
    )
    base = _sets(args) + ["train.eval_every=100000"]
    cfg_file = config_path("demo-cpu.yaml")
    slm = base + [
        "rho1.mode=excess",
        f"rho1.select_ratio={select_ratio}",
        f"rho1.reference={reference}",
    ]
    pre_store = out / "store-prefilled"
    variants = {
        "none": load_config(cfg_file, base + ["rho1.mode=none"]),
        **_throughput_variants(scorer_nice, bf16),
        "prefilled": load_config(
            cfg_file, slm + ["rho1.scorer=prefilled", f"rho1.store={pre_store}"]
        ),
    }
    fill = prefill(variants["prefilled"], str(reference), str(pre_store), progress=False)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for r, name in rotated_rounds(list(variants), repeats):
        cfg = variants[name]
        if isinstance(cfg, list):  # the scored variants: a fresh store each run
            live = ["rho1.scorer=process", f"rho1.store={out / f'store-{name}-{r}'}"]
            cfg = load_config(cfg_file, slm + live + cfg)
        res = _train(cfg, out / f"{name}-{r}", f"throughput {name} #{r}")
        runs[name].append({"round": r, **{k: res[k] for k in _RUN_KEYS}})

    def agg(name: str, key: str) -> float:
        xs = runs[name]
        num = sum(x["tokens"] for x in xs)
        den = sum(x["train_steps_s" if key == "tokens_per_s" else "wall_s"] for x in xs)
        return num / den

    res = {
        "steps": steps,
        "repeats": repeats,
        "runs": runs,
        "tokens_per_s": {k: agg(k, "tokens_per_s") for k in runs},
        "tokens_per_s_wall": {k: agg(k, "tokens_per_s_wall") for k in runs},
        # the median run of each variant: one slow run moves the pooled figure above, not this
        "tokens_per_s_median": {
            k: statistics.median(x["tokens_per_s"] for x in xs) for k, xs in runs.items()
        },
        "prefill": fill,
    }
    res.update(_throughput_ratios(res["tokens_per_s"]))
    res["ratios_of_medians"] = _throughput_ratios(res["tokens_per_s_median"])
    if bf16:
        res["bf16_vs_fp32_store"] = compare_stores(
            out / "store-live_scorer-0", out / "store-live_scorer_bf16-0", select_ratio
        )
    (out / "rho1_throughput.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None else fmt.format(x)


def format_table(r: dict[str, Any]) -> str:
    tp, tpw = r["tokens_per_s"], r["tokens_per_s_wall"]
    lines = [
        f"Target demo-cpu ({r['target_active_params'] / 1e6:.2f}M active), {r['steps']} steps, "
        f"{r['tokens_per_run']:,} tokens per run, web noise {r['noise_share']:.0%} of samples; "
        f"reference ref-demo ({r['reference_active_params'] / 1e6:.2f}M active) trained on "
        "the clean domains; select_ratio "
        f"{r['select_ratio']}.",
        "",
        "| run | clean val loss | "
        + " | ".join(
            f"val {k.split('/', 1)[1]}"
            for k in sorted(r.get("clm_last_eval") or {})
            if k.startswith("val_loss/")
        )
        + " |",
        "|---|---|"
        + "---|" * len([k for k in (r.get("clm_last_eval") or {}) if k.startswith("val_loss/")]),
    ]
    for name, key in (("CLM (mode=none)", "clm_last_eval"), ("SLM (mode=excess)", "slm_last_eval")):
        ev = r.get(key) or {}
        vals = " | ".join(_f(ev[k]) for k in sorted(ev) if k.startswith("val_loss/"))
        lines.append(f"| {name} | {_f(ev.get('clean_val_loss'))} | {vals} |")
    lines += [
        "",
        "| selection (SLM run, all training tokens) | selected fraction |",
        "|---|---|",
        f"| noise tokens (webnoise) | {_f(r['noise_selected_frac'], '{:.3f}')} |",
        f"| clean tokens (prose, code, math) | {_f(r['clean_selected_frac'], '{:.3f}')} |",
    ]
    for n, v in (r.get("selected_frac_by_domain") or {}).items():
        lines.append(f"| &nbsp;&nbsp;{n} | {_f(v, '{:.3f}')} |")
    lines += [
        "",
        "| throughput | tokens/s (steps) | vs mode=none | tokens/s (wall, incl. start-up) |",
        "|---|---|---|---|",
        f"| mode=none | {_f(tp['none'], '{:.0f}')} | 1.00 | {_f(tpw['none'], '{:.0f}')} |",
        f"| excess, live scorer | {_f(tp['live_scorer'], '{:.0f}')} | "
        f"{_f(r['throughput_ratio_live_vs_none'], '{:.2f}')} | {_f(tpw['live_scorer'], '{:.0f}')} |",
        f"| excess, prefilled store | {_f(tp['prefilled'], '{:.0f}')} | "
        f"{_f(r['throughput_ratio_prefilled_vs_none'], '{:.2f}')} | {_f(tpw['prefilled'], '{:.0f}')} |",
    ]
    if r.get("prefill"):
        p = r["prefill"]
        lines.append(
            f"\nOffline prefill (`sigma-moe score`): {p['rows_written']} samples in "
            f"{p['seconds']:.1f} s ({p['tokens_per_s']:.0f} tokens/s)."
        )
    return "\n".join(lines) + "\n"
