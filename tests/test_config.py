"""Config: typed YAML / --set loading; errors name the dotted key."""

import subprocess
import sys
from pathlib import Path

import pytest

from sigma_moe.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_recipes_load_and_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.max_steps >= 1, path


def test_set_overrides_are_yaml_typed():
    cfg = load_config(
        REPO / "configs/demo-cpu.yaml",
        ["train.max_steps=50", "model.router_topk=[4, 1, 1, 1]", "train.lr=3e-4"],
    )
    assert cfg.train.max_steps == 50
    assert cfg.model.router_topk == [4, 1, 1, 1]
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_stepz=5", "train.max_stepz"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("rho1.select_ratio=1.5", "rho1.select_ratio"),
        ("model.lb_loss_type=sometimes", "model.lb_loss_type"),
        ("data.domains=[{name: a, wieght: 1}]", "data.domains[0].wieght"),
        ("parallel.zero_stage=3", "parallel.zero_stage"),
        ("model.preset=huge", "model.preset"),
        ("train.precision=fp8", "train.precision"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(REPO / "configs/demo-cpu.yaml", [override])


def test_rho1_needs_a_reference():
    with pytest.raises(ConfigError, match="rho1.reference"):
        load_config(None, ["rho1.mode=excess"])


def test_cli_reports_config_error_by_key(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sigma_moe",
            "train",
            str(REPO / "configs/test-tiny.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.lrr=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "unknown config key 'train.lrr'" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config
