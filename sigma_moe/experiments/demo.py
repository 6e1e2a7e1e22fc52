"""`sigma-moe demo`: the bundled corpus → a demo-cpu Sigma-MoE trained on CPU → evaluation,
summary and plots; with Rho-1, the reference model and the selective-LM comparison too.

Ctrl-C / SIGTERM stops the current stage after its step with a checkpoint and then the whole
demo (`StageInterrupted`, nothing reported from the stopped stage); a second one stops at once.
`--resume auto` continues every stage from its newest checkpoint (finished stages only
re-read their summary)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sigma_moe.config import load_config
from sigma_moe.data.bundled import ensure_bundled_data
from sigma_moe.run import run_training
from sigma_moe.train.callbacks import require_complete
from sigma_moe.train.report import write_report

from . import config_path
from . import rho1 as rho1_experiment


def run_demo(out: Path, steps: int | None = None, rho1: bool = True, resume: str = "none") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[demo] bundled corpus and datasets: {ensure_bundled_data()}", file=sys.stderr)
    overrides = [f"train.max_steps={steps}"] if steps else []
    cfg = load_config(config_path("demo-cpu.yaml"), overrides)
    print(
        f"[demo] training the demo-cpu MoE ({cfg.train.max_steps} steps) into {out / 'moe'}",
        file=sys.stderr,
    )
    summary = run_training(cfg, out / "moe", resume=resume)
    hint = f"sigma-moe demo --out {out}" + (f" --steps {steps}" if steps else "")
    hint += ("" if rho1 else " --no-rho1") + " --resume auto"
    require_complete(summary, "demo-cpu MoE", out / "moe", hint)
    result = {"moe": summary}
    first, last = summary["first_eval"]["val_loss"], summary["last_eval"]["val_loss"]
    result["val_loss_drop_pct"] = 100 * (1 - last / first)
    if rho1:
        result["rho1"] = rho1_experiment.run_rho1_experiment(
            out / "rho1", steps=steps, resume=resume, resume_hint=hint
        )
    report = write_report(out / "moe")
    result["wall_time_s"] = time.perf_counter() - t0
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1, default=str))
    print(
        f"\n[demo] average validation loss {first:.3f} -> {last:.3f} "
        f"({result['val_loss_drop_pct']:.1f}% lower); plots in {out / 'moe' / 'plots'}; "
        f"total {result['wall_time_s'] / 60:.1f} min",
        file=sys.stderr,
    )
    print(f"[demo] report: {report}")  # last line: open it in a browser
    return result
