"""The experiments package: recipes found as package resources; the balancing experiment's
variants are valid 2-process configs and its analysis reads a run's metrics.jsonl."""

import json

import pytest

from sigma_moe.config import load_config
from sigma_moe.experiments import balancing, config_path


def test_config_path_finds_the_bundled_recipes():
    assert config_path("demo-cpu.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config_path("nope.yaml")


@pytest.mark.parametrize("variant", list(balancing.VARIANTS))
def test_balancing_variants_are_valid_configs(variant):
    cfg = load_config(config_path("demo-cpu.yaml"), balancing.overrides(variant, 10))
    assert cfg.check_world(balancing.WORLD) == 1  # one micro-batch per process and step
    assert cfg.build_model(8192).num_experts == 96
    sched = cfg.model.topk_schedule
    assert (variant == "global_progressive") == bool(sched)
    if sched:
        assert sched[0].until_step == 4 and sched[0].layers == [0, 1] and sched[0].topk == 8


def _fake_run(run_dir, steps, layers, load_max):
    run_dir.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 5.0, "lm_loss_all": 5.0 - s / 10, "tokens_per_s": 100.0 + s}
        for li in range(layers):
            r |= {
                f"expert_load_max/{li}": load_max + li,
                f"expert_load_cv/{li}": 1.0,
                f"expert_load_entropy/{li}": 0.5,
                f"expert_idle_frac/{li}": 0.25,
            }
        rows.append(r)
    rows += [{"step": 0, "val_loss": 9.0}, {"step": steps, "val_loss": 6.0}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_balancing_analysis(tmp_path):
    _fake_run(tmp_path / "none", steps=8, layers=3, load_max=4.0)
    _fake_run(tmp_path / "aux_free", steps=8, layers=3, load_max=2.0)
    res = balancing.summarise(tmp_path, ["none", "aux_free"])
    assert res["none"]["last_quarter"]["expert_load_max"] == [4.0, 5.0, 6.0]
    assert res["aux_free"]["val_loss"] == 6.0 and res["aux_free"]["val_loss_start"] == 9.0
    # last quarter = steps 7-8: lm_loss_all 4.3, 4.2; median tokens/s over all 8 steps
    assert res["none"]["lm_loss_last_quarter"] == pytest.approx(4.25)
    assert res["none"]["tokens_per_s_median"] == pytest.approx(104.5)
    md = balancing.table(res)
    assert "layers 0-2" in md and "| aux_free | 6.000 | 104 | 2.0 / 3.0 / 4.0 |" in md
    balancing.plot(tmp_path, ["none", "aux_free"], tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 10_000
