"""Bad mixing input: each gets an error naming the key or value, before any training."""

from __future__ import annotations

import pytest

from sigma_moe.config import ConfigError, load_config

TINY = "configs/test-tiny.yaml"
DOMS = "data.domains=[{name: a, path: bundled:prose, weight: %s}, {name: b, path: bundled:code, weight: %s}]"


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ([DOMS % (-1, 1)], r"data\.domains\[0\]\.weight.*-1"),
        ([DOMS % (".nan", 1)], r"data\.domains\[0\]\.weight.*nan"),
        ([DOMS % (0, 0)], r"data\.domains.*sum to 0"),
        (
            ["data.domains=[{name: a, path: bundled:prose}, {name: a, path: bundled:code}]"],
            r"data\.domains.*duplicate",
        ),
        (["data.mixing.kind=online-bandit", "data.mixing.update_every=0"], r"update_every.*0"),
        (["data.mixing.kind=online-bandit", "data.mixing.floor=0.3"], r"data\.mixing\.floor.*0\.3"),
        (["data.mixing.kind=online-doremi"], r"rho1\.reference.*online-doremi"),
        (
            [
                "data.mixing.kind=online-bandit",
                "rho1.mode=excess",
                "rho1.reference=x",
                "rho1.scorer=prefilled",
            ],
            r"rho1\.scorer.*prefilled.*process or inline",
        ),
        (
            ["data.mixing.kind=online-doremi", "rho1.reference=x", "rho1.scorer=prefilled"],
            r"rho1\.scorer.*prefilled",
        ),
        (["data.mixing.kind=online-random"], r"data\.mixing\.kind"),
    ],
)
def test_config_errors_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, sets)


def test_online_mixing_accepts_the_scorer_side_process():
    sets = ["data.mixing.kind=online-bandit", "rho1.mode=excess", "rho1.reference=x"]
    assert load_config(TINY, [*sets, "rho1.scorer=process"]).rho1.scorer == "process"


def test_floor_at_the_limit_is_allowed():
    cfg = load_config(TINY, ["data.mixing.kind=online-bandit", "data.mixing.floor=0.25"])
    assert cfg.data.mixing.floor * len(cfg.data.domains) == 1


def test_doremi_reference_of_another_tokenizer_is_refused(tmp_path):
    from _rho1_helpers import make_ours_reference

    from sigma_moe.data.tokenizer import load_tokenizer
    from sigma_moe.run_mixing import online_data_policy

    ref = make_ours_reference(tmp_path / "ref", tokenizer_fingerprint="other-tokenizer")
    cfg = load_config(TINY, ["data.mixing.kind=online-doremi", f"rho1.reference={ref}"])
    with pytest.raises(ValueError, match="other-tokenizer"):
        online_data_policy(cfg, load_tokenizer("bundled"), 8, out_dir=tmp_path / "run")


def test_online_kind_without_the_mixing_assembly_is_refused(tmp_path):
    from sigma_moe.train.loop import run_training

    cfg = load_config(TINY, ["data.mixing.kind=online-bandit"])
    with pytest.raises(ValueError, match="data.mixing.kind"):
        run_training(cfg, tmp_path / "run")
