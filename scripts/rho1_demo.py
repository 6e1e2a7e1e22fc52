#!/usr/bin/env python
"""Rho-1 experiment on the bundled corpus (see ``sigma_moe/experiments/rho1.py``).

    python scripts/rho1_demo.py --out runs/rho1-demo
    python scripts/rho1_demo.py --out /tmp/r --steps 40 --ref-steps 40 --no-prefilled  # smoke

Trains the clean-domain reference, then the demo-cpu target for the same steps with
rho1.mode=none (CLM), excess with the live scorer (SLM) and excess from a prefilled store;
writes DIR/rho1_results.json, DIR/rho1_table.md, DIR/rho1_tokens.html and DIR/rho1_tokens.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sigma_moe.experiments.rho1 import (
    DEFAULT_REF_STEPS,
    DEFAULT_STEPS,
    measure_throughput,
    run_rho1_experiment,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="target steps (each run)")
    ap.add_argument("--ref-steps", type=int, default=DEFAULT_REF_STEPS, help="reference steps")
    ap.add_argument("--noise-share", type=float, default=0.5, help="web-noise share of samples")
    ap.add_argument("--select-ratio", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-prefilled", action="store_true", help="skip the prefilled-store run")
    ap.add_argument("--reference", type=Path, default=None, help="reuse a trained reference")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the interleaved throughput comparison (needs --reference); --steps per run",
    )
    ap.add_argument("--repeats", type=int, default=2, help="throughput: runs per variant")
    ap.add_argument(
        "--scorer-nice",
        type=int,
        nargs="*",
        default=[],
        help="throughput: also live-scorer runs with rho1.scorer_nice=N for each N",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="throughput: also rho1.reference_dtype=bf16 runs (side process and inline)",
    )
    a = ap.parse_args(argv)
    if a.throughput_only:
        if a.reference is None:
            ap.error("--throughput-only needs --reference")
        t = measure_throughput(
            a.out,
            a.reference,
            a.steps,
            a.repeats,
            a.noise_share,
            a.select_ratio,
            a.seed,
            scorer_nice=a.scorer_nice,
            bf16=a.bf16,
        )
        print(f"{'':<18} {'pooled':>8} {'median':>8} {'wall':>8}  tokens/s (steps; wall)")
        for k, v in t["tokens_per_s"].items():
            med, wall = t["tokens_per_s_median"][k], t["tokens_per_s_wall"][k]
            print(f"{k:<18} {v:8.0f} {med:8.0f} {wall:8.0f}")
        print(f"{'ratio':<24} {'pooled':>7} {'median':>7}")
        for k, v in t.items():
            if k.startswith(("throughput_ratio_live", "throughput_ratio_inline")):
                med = t["ratios_of_medians"][k]
                print(f"{k[len('throughput_ratio_') :]:<24} {v:7.3f} {med:7.3f}")
        if "bf16_vs_fp32_store" in t:
            print("bf16 vs fp32 store:", t["bf16_vs_fp32_store"])
        return 0
    res = run_rho1_experiment(
        a.out,
        a.steps,
        ref_steps=a.ref_steps,
        noise_share=a.noise_share,
        select_ratio=a.select_ratio,
        seed=a.seed,
        prefilled=not a.no_prefilled,
        reference=a.reference,
        progress=not a.no_progress,
    )
    print(
        f"clean val loss: CLM {res['clm_clean_val_loss']:.4f}  SLM {res['slm_clean_val_loss']:.4f}"
    )
    print(
        f"selected: noise {res['noise_selected_frac']:.3f}  clean {res['clean_selected_frac']:.3f}"
    )
    print(f"wrote {a.out / 'rho1_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
