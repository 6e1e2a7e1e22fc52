"""One per-domain evaluation (sigma_moe.train.evaluate): `sigma-moe eval` on a run's last
checkpoint gives, bit for bit, the validation losses the training loop logged at that step."""

import json
from pathlib import Path

from sigma_moe import cli
from sigma_moe.config import load_config
from sigma_moe.train.evaluate import eval_metrics
from sigma_moe.train.loop import run_training

REPO = Path(__file__).resolve().parents[2]


def test_eval_cli_reproduces_the_loops_last_eval(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        REPO / "configs/test-tiny.yaml",
        ["train.max_steps=6", "train.eval_every=6", "checkpoint.every=6"],
    )
    run_training(cfg, run)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "val_loss" in r][-1]
    assert logged["step"] == 6
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(run / "checkpoints"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [d.name for d in cfg.data.domains]
    assert sorted(res["val_loss"]) == sorted(names)
    for name in names:
        assert res["val_loss"][name] == logged[f"val_loss/{name}"], name  # bitwise
    assert res["clean_val_loss"] == logged["clean_val_loss"]
    # the loop's summary keys come from the same function
    again = eval_metrics(res["val_loss"], [d.name for d in cfg.data.domains if d.clean])
    for k in ("val_loss", "val_loss_worst", "clean_val_loss"):
        assert again[k] == logged[k], k


def test_eval_metrics_without_clean_domains():
    m = eval_metrics({"a": 1.0, "b": 3.0}, clean=["c"])
    assert m == {"val_loss/a": 1.0, "val_loss/b": 3.0, "val_loss": 2.0, "val_loss_worst": 3.0}
