"""The Rho-1 callback inside the real trainer (tiny model, a few steps)."""

import json

import pytest

from sigma_moe.config import load_config
from sigma_moe.rho1.callback import Rho1Callback
from sigma_moe.train.loop import run_training


def _cfg(reference, scorer, steps=3, **rho1):
    sets = [
        f"train.max_steps={steps}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "rho1.mode=excess",
        "rho1.select_ratio=0.5",
        f"rho1.reference={reference}",
        f"rho1.scorer={scorer}",
        "rho1.scorer_batch_size=4",
        "checkpoint.every=100",
        "train.eval_every=100",
    ] + [f"rho1.{k}={v}" for k, v in rho1.items()]
    return load_config("configs/test-tiny.yaml", sets)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scorer", ["inline", pytest.param("process", marks=pytest.mark.slow)])
def test_train_with_selection(hf_reference, tmp_path, scorer):
    cfg = _cfg(hf_reference, scorer)
    out = tmp_path / "run"
    run_training(cfg, out, extra_callbacks=[Rho1Callback(cfg.rho1, out, run_config=cfg)])
    ms = [m for m in _metrics(out) if "lm_loss" in m]
    assert len(ms) == 3
    for m in ms:
        assert m["selected_frac"] == pytest.approx(0.5, abs=0.01)
        assert "excess_loss_selected" in m and m["excess_loss_selected"] > m["excess_loss_rejected"]
        assert any(k.startswith("selected_frac/") for k in m)
    assert (out / "ref_store" / "meta.json").is_file()
