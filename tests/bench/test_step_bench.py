"""`sigma-moe bench step`: the variants train the same batches; ours with the default
(unchunked at this size) and the forced chunked CE must give the same losses."""

from __future__ import annotations

import pytest

from sigma_moe.bench import step


def test_chunked_and_full_ce_variants_train_alike():
    res = step.run(["ours", "ours-chunked-ce"], experts=4, steps=2, warmup=1)
    a, b = (r["loss_first_last"] for r in res["rows"])
    assert a == b  # 3 decimals of the first and last loss
    first, last = (float(x) for x in a.split(" -> "))
    assert last < first  # it trains
    assert all(r["tokens_per_s"] > 0 and r["median_ms"] > 0 for r in res["rows"])


def test_unknown_variant_is_named(capsys):
    with pytest.raises(SystemExit):
        step.main(["--variants", "ours,megablocks"])
    assert "megablocks" in capsys.readouterr().err
