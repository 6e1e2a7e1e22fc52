"""Mixing and Rho-1 selection together: mixing chooses what is read, selection what is learned
from; the mixer's per-domain signal is over every valid token (selection does not censor it)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from sigma_moe.config import load_config


def _train(cfg, out):
    from sigma_moe.run import run_training  # the run assembly builds the Rho-1 objective

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(cfg, out)
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m]


def _weights(m):
    return {k: v for k, v in m.items() if k.startswith("mix_weight/")}


@pytest.mark.slow
@pytest.mark.parametrize("rho1_mode", ["none", "excess"])
def test_online_doremi_reads_the_scorer_side_process(tmp_path, ours_reference, rho1_mode):
    """rho1.scorer=process: the side process scores the mixer's plan (no global order), and
    the run is the one the inline scorer gives: same losses, same weights."""
    sets = [
        "train.max_steps=4",
        "train.eval_every=4",
        "data.val_samples_per_domain=2",
        "data.mixing.kind=online-doremi",
        "data.mixing.update_every=1",
        f"rho1.mode={rho1_mode}",
        "rho1.select_ratio=0.5",
        "rho1.scorer_lookahead=8",
        f"rho1.reference={ours_reference}",
    ]
    runs = {
        mode: _train(
            load_config("configs/test-tiny.yaml", [*sets, f"rho1.scorer={mode}"]), tmp_path / mode
        )
        for mode in ("inline", "process")
    }
    a, b = runs["inline"], runs["process"]
    assert len(a) == len(b) == 4
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert [_weights(m) for m in b] == [_weights(m) for m in a]
    assert _weights(b[-1])["mix_weight/prose"] != _weights(b[0])["mix_weight/prose"]  # moved
    if rho1_mode == "excess":
        assert all(abs(m["selected_frac"] - 0.5) < 0.05 for m in b)
        doc = json.loads((tmp_path / "process" / "rho1_selection.json").read_text())
        assert doc["scorer"]["mode"] == "process" and doc["scorer"]["scorer_restarts"] == 0


@pytest.mark.slow
def test_doremi_with_rho1_selection_inline(tmp_path, ours_reference):
    from sigma_moe.run import run_training  # the run assembly builds the Rho-1 objective

    cfg = load_config(
        "configs/test-tiny.yaml",
        [
            "train.max_steps=3",
            "train.eval_every=3",
            "data.val_samples_per_domain=2",
            "data.mixing.kind=online-doremi",
            "data.mixing.update_every=1",
            "rho1.mode=excess",
            "rho1.select_ratio=0.5",
            "rho1.scorer=inline",
            f"rho1.reference={ours_reference}",
        ],
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert len(steps) == 3
    for m in steps:
        assert abs(m["selected_frac"] - 0.5) < 0.05  # selection acted
        w = [v for k, v in m.items() if k.startswith("mix_weight/")]
        assert len(w) == 4 and abs(sum(w) - 1) < 1e-9 and min(w) >= 0.01 - 1e-12
    # the excess loss of a random reference differs by domain: the weights moved off the start
    assert steps[-1]["mix_weight/prose"] != steps[0]["mix_weight/prose"]
