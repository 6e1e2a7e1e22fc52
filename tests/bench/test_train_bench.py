"""`sigma-moe bench train`: the harness returns real figures, and the transformers peer it
measures against computes the same training as ours (same weights, same batches)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sigma_moe.bench import train as bench_train

REPO = Path(__file__).resolve().parents[2]


def test_quick_harness_returns_real_numbers(tmp_path):
    """Two variants, each a fresh process, on the same batches (test-tiny sizes)."""
    out = tmp_path / "bench.json"
    rc = bench_train.main(
        ["--quick", "--experts", "8", "--variants", "ours", "hf", "--json", str(out)]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["machine"]["torch"] and "loadavg_end" in res["machine"]
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"ours", "hf"}
    for v, r in rows.items():
        assert "error" not in r, (v, r.get("error"))
        assert r["runs"] == 1 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 50
        # an untrained LM over the 8192-token bundled vocabulary: CE ~ ln(8192) = 9.01
        assert abs(r["first_loss"] - math.log(8192)) < 0.5, (v, r["first_loss"])
    assert rows["ours"]["vs_best_peer"] == pytest.approx(
        rows["ours"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    )


def test_solo_floor_runs_each_share_alone(tmp_path):
    """ours-solo (EP=2's compute floor): two plain runs at once, each on half the batch with half
    the experts; reported beside ours, never as a peer."""
    out = tmp_path / "bench.json"
    rc = bench_train.main(
        ["--quick", "--experts", "8", "--nproc", "2", "--variants", "ours-solo", "--json", str(out)]
    )
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "ours-solo" and "error" not in row, row.get("error")
    assert row["runs"] == 1 and row["tokens_per_s"] > 0 and "vs_best_peer" not in row
    assert abs(row["first_loss"] - math.log(8192)) < 0.5
    half = bench_train._recipe(8, 3, True, 1, solo_of=2)
    full = bench_train._recipe(8, 3, True, 1)
    assert half.model.num_experts == 4
    assert 2 * half.train.global_batch_size == full.train.global_batch_size


class _Capture:
    """Our model's initial weights and the trainer's dataset and sampler (before step 1)."""

    def on_train_start(self, trainer):
        self.hf = bench_train.hf_copy_of(trainer.model)
        self.ds, self.sampler = trainer.train_ds, trainer.sampler


# (lr, bound on |ours - theirs| for steps 1-4 and for all 20, least loss drop). Both runs
# agree bitwise at step 1; the rounding differences of the two implementations' backward passes
# then grow through Adam (its first updates are ~lr * sign(grad), so a gradient element near 0
# whose sign differs in the last bit moves its weight by a whole lr) and the growth scales with
# lr (measured 2026-12-01 s4, max over 20 steps: lr 3e-4 1.5e-4; 1e-3 2.7e-3; the recipe's 3e-3
# 6.8e-3 -- also 3.6e-3 with top-8 of 8 experts, so not routing flips). The 1e-3 over
# 20 steps holds at lr 3e-4; at the recipe's lr the test keeps the looser bound it measured.
SAME_MATH = [
    pytest.param(3e-4, 1e-5, 1e-3, 0.05, id="lr3e-4-within-1e-3"),
    pytest.param(None, 1e-4, 2e-2, 0.3, id="recipe-lr"),
]


@pytest.mark.parametrize("lr, bound4, bound20, drop", SAME_MATH)
def test_same_math_as_transformers_for_20_steps(tmp_path, lr, bound4, bound20, drop):
    """From identical initial weights (ours copied into Qwen3MoeForCausalLM) and identical
    batches, fp32: our trainer's per-step losses stay within `bound20` of the transformers
    loop's over 20 steps (1e-3, the issue's bound, at lr 3e-4)."""
    import torch

    from sigma_moe.config import load_config
    from sigma_moe.train.loop import run_training

    cfg = load_config(
        REPO / "configs" / "test-tiny.yaml",
        [
            "train.max_steps=20",
            "train.precision=fp32",
            "train.weight_decay=0.0",  # ours groups decay per parameter kind; the peer does not
            "train.eval_every=1000",
            "checkpoint.every=1000",
            "model.lb_coeff=0.0",  # transformers' balance loss is another formula
            "model.z_loss_coeff=0.0",
            "model.topk_schedule=[]",
            *([f"train.lr={lr}"] if lr else []),
        ],
    )
    cap = _Capture()
    run_training(cfg, tmp_path / "run", extra_callbacks=[cap])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = [m["lm_loss"] for m in lines if "lm_loss" in m]
    opt = torch.optim.AdamW(
        cap.hf.parameters(),
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        eps=1e-8,
        weight_decay=0.0,
        fused=True,
    )
    _, theirs = bench_train.train_peer(cfg, cap.hf, opt, cap.ds, cap.sampler, 20)
    assert len(ours) == len(theirs) == 20
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    assert diffs[0] < 1e-6, (ours[0], theirs[0])  # the same forward (bitwise on this machine)
    assert max(diffs[:4]) < bound4, list(zip(ours, theirs))
    assert max(diffs) < bound20, list(zip(ours, theirs))
    assert ours[-1] < ours[0] - drop  # it trained: not a comparison of two frozen models
