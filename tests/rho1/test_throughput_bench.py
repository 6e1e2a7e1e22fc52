"""`measure_throughput` (scripts/rho1_demo.py --throughput-only): its bookkeeping, with the
training runs faked (the runs themselves are the trainer's, tested elsewhere)."""

from __future__ import annotations

import statistics

import pytest

from sigma_moe.experiments import rho1 as exp

# tokens/s of each variant's runs, by round: one slow `none` run (round 1)
SPEED = {
    "none": [5000.0, 2500.0, 5200.0],
    "live_scorer": [3800.0, 3900.0, 3700.0],
    "inline": [4400.0, 4300.0, 4500.0],
    "prefilled": [5100.0, 5000.0, 4900.0],
}
TOKENS = 102_400


def test_rounds_rotate_scored_runs_get_fresh_stores_and_medians_are_reported(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, out, label):
        name, r = out.name.rsplit("-", 1)
        calls.append((int(r), name, cfg.rho1.mode, cfg.rho1.scorer, str(cfg.rho1.store)))
        t = TOKENS / SPEED[name][int(r)]
        return {"tokens": TOKENS, "train_steps_s": t, "wall_s": t + 5, "tokens_per_s": TOKENS / t,
                "tokens_per_s_wall": TOKENS / (t + 5)}  # fmt: skip

    monkeypatch.setattr(exp, "_train", fake_train)
    monkeypatch.setattr(exp, "prefill", lambda *a, **k: {"rows": 1})
    ref = tmp_path / "ref"
    ref.mkdir()
    res = exp.measure_throughput(tmp_path / "tp", ref, steps=2, repeats=3)

    names = ["none", "live_scorer", "inline", "prefilled"]
    by_round = [[c[1] for c in calls if c[0] == r] for r in range(3)]
    assert by_round == [names, names[1:] + names[:1], names[2:] + names[:2]]
    scored = [c for c in calls if c[1] in ("live_scorer", "inline")]
    assert len({c[4] for c in scored}) == 6  # a fresh store for every scored run
    assert {c[3] for c in calls if c[1] == "inline"} == {"inline"}
    assert {c[3] for c in calls if c[1] == "prefilled"} == {"prefilled"}
    assert {c[2] for c in calls if c[1] == "none"} == {"none"}
    assert [x["round"] for x in res["runs"]["none"]] == [0, 1, 2]

    med = res["tokens_per_s_median"]
    assert med == {k: pytest.approx(statistics.median(v)) for k, v in SPEED.items()}
    pooled_none = 3 * TOKENS / sum(TOKENS / s for s in SPEED["none"])
    assert res["tokens_per_s"]["none"] == pytest.approx(pooled_none)
    # the slow run drags the pooled `none` down, so scored/none looks better pooled than by median
    pooled_inline = 3 * TOKENS / sum(TOKENS / s for s in SPEED["inline"])
    assert res["throughput_ratio_inline_vs_none"] == pytest.approx(pooled_inline / pooled_none)
    assert (
        res["throughput_ratio_inline_vs_none"]
        > res["ratios_of_medians"]["throughput_ratio_inline_vs_none"]
    )
    assert res["ratios_of_medians"]["throughput_ratio_inline_vs_none"] == pytest.approx(4400 / 5000)
    assert res["ratios_of_medians"]["throughput_ratio_live_vs_prefilled"] == pytest.approx(
        3800 / 5000
    )
    assert (tmp_path / "tp" / "rho1_throughput.json").exists()
