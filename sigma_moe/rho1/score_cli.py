"""``sigma-moe score CONFIG --reference PATH --store DIR [--num-samples N] [--set k=v ...]``:
the scoring code the side process runs, run standalone to prefill a store offline (for
``rho1.scorer=prefilled``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from sigma_moe.config import load_config
from sigma_moe.rho1.reference import load_reference, reference_dtype

from .scoring import (
    as_run_config,
    build_dataset,
    default_device,
    default_num_samples,
    open_store,
    score_range,
)


def prefill(
    cfg,
    reference: str,
    store_path: str,
    num_samples: int | None = None,
    start: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score global samples [start, num_samples) of the run's dataset into the store."""
    cfg = as_run_config(cfg)
    if cfg.data.mixing.kind != "static":
        raise ValueError(
            f"data.mixing.kind={cfg.data.mixing.kind!r}: an online mixer's samples have no global "
            "order to prefill; train with rho1.scorer=process (it scores the mixer's plan)"
        )
    ds = build_dataset(cfg, num_samples)
    ref = load_reference(
        reference, ds.tokenizer, device=default_device(), dtype=reference_dtype(cfg)
    )
    store = open_store(store_path, ds, "w", ref.fingerprint)
    n = min(int(num_samples or default_num_samples(cfg)), len(ds))
    bs = int(batch_size or cfg.rho1.scorer_batch_size)
    t0 = time.monotonic()
    bar = None
    if progress:
        bar = tqdm(total=n - start, desc="scoring", unit="sample", dynamic_ncols=True)
    written = 0
    chunk = max(bs, 64)
    for s in range(start, n, chunk):
        written += score_range(ref, ds, store, s, min(n, s + chunk), bs)
        if bar is not None:
            bar.update(min(n, s + chunk) - s)
    if bar is not None:
        bar.close()
    store.close()
    dt = time.monotonic() - t0
    return {
        "store": str(store_path),
        "samples": n - start,
        "rows_written": written,
        "seconds": dt,
        "tokens_per_s": written * ds.seq_len / dt if dt > 0 else 0.0,
        "reference": ref.path,
        "reference_params": ref.num_params,
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="sigma-moe score",
        description="Prefill a Rho-1 reference-loss store offline: score the training samples "
        "of CONFIG with the reference model (the code the scorer side process runs).",
    )
    p.add_argument("config", help="run recipe (YAML), the same the trainer uses")
    p.add_argument("--reference", default=None, help="reference model (default: rho1.reference)")
    p.add_argument("--store", default=None, help="store folder (default: rho1.store)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="global samples to score (default: train.max_steps × train.global_batch_size)",
    )
    p.add_argument("--start", type=int, default=0, help="first global sample to score")
    p.add_argument("--batch-size", type=int, default=None, help="default: rho1.scorer_batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    reference = args.reference or cfg.rho1.reference
    store = args.store or cfg.rho1.store
    if not reference:
        print("error: no reference model: pass --reference or set rho1.reference", file=sys.stderr)
        return 2
    if not store:
        print("error: no store folder: pass --store or set rho1.store", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = prefill(
            cfg,
            reference,
            store,
            num_samples=args.num_samples,
            start=args.start,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"scored {res['rows_written']} new rows of {res['samples']} samples into {res['store']} "
        f"in {res['seconds']:.1f} s ({res['tokens_per_s']:.0f} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
