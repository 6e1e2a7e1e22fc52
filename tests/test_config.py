"""Config: typed YAML / --set loading; errors name the dotted key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sigma_moe.config import ConfigError, ModelConfig, load_config

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
        ("rho1.scorer_nice=20", "rho1.scorer_nice"),
        ("rho1.reference_dtype=fp16", "rho1.reference_dtype"),
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


# Cross-field checks that used to run after start-up (in train/engine.py, the model, the loop):
# each bad config now fails at load, naming the dotted key.
@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (["model.router_topk=[1, 1, 1]"], "model.router_topk", "3 entries for 4 layers"),
        (["model.router_topk=33"], "model.router_topk", "must be in [1, 32]"),
        (["model.num_experts=4", "model.router_topk=[1, 1, 8, 1]"], "model.router_topk", "[1, 4]"),
        (
            ["model.topk_schedule=[{until_step: 3, layers: [4], topk: 2}]"],
            "model.topk_schedule[0].layers",
            "not in [0, 4)",
        ),
        (
            ["model.num_layers=2", "model.topk_schedule=[{until_step: 3, layers: [2], topk: 2}]"],
            "model.topk_schedule[0].layers",
            "not in [0, 2)",
        ),
        (["parallel.ep_size=3"], "parallel.ep_size", "does not divide num_experts=32"),
        (["model.num_kv_heads=3"], "model.num_kv_heads", "does not divide 4 query heads"),
        (["model.head_dim=15"], "model.head_dim", "even head_dim"),
        (["model.vocab_size=4096"], "model.vocab_size", "4096 rows for a tokenizer of 8192"),
        (
            ["parallel.ep_size=2", "train.micro_batch_size=8", "train.global_batch_size=8"],
            "train.global_batch_size",
            "x parallel.ep_size (2)",
        ),
    ],
)
def test_cross_field_checks_fail_at_load(overrides, key, says):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")) as e:
        load_config(REPO / "configs/demo-cpu.yaml", overrides)
    assert says in str(e.value)


def test_check_world_names_the_key():
    cfg = load_config(REPO / "configs/demo-cpu.yaml", ["parallel.ep_size=2"] + BATCH_16)
    assert cfg.check_world(2) == 1  # gradient-accumulation steps
    with pytest.raises(ConfigError, match="'parallel.ep_size': 2 must divide the number of "):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="'parallel.ep_size': 2 must divide the number of "):
        cfg.check_world(1)
    with pytest.raises(
        ConfigError, match=r"'train.global_batch_size': 16 is not divisible .* size \(4\)"
    ):
        cfg.check_world(4)


BATCH_16 = ["train.micro_batch_size=8", "train.global_batch_size=16"]


def test_model_config_builds_what_the_run_describes():
    cfg = load_config(
        REPO / "configs/demo-cpu.yaml",
        [
            "model.router_topk=[2, 1, 1, 1]",
            "parallel.ep_size=2",
            "train.seed=7",
            "data.seq_len=2048",
        ]
        + BATCH_16,
    )
    m = cfg.build_model(8001)
    assert isinstance(cfg.model, ModelConfig)
    assert (m.num_layers, m.num_experts, m.router_topk) == (4, 32, [2, 1, 1, 1])
    assert m.vocab_size == 8064  # the tokenizer's 8001, padded to a multiple of 64
    # what the other sections decide, passed in by RunConfig.build_model
    assert (m.ep_size, m.init_seed, m.max_seq_len) == (2, 7, 2048)
    # the section alone builds too; a value the model refuses names its key
    assert cfg.model.build(512, ep_size=1, activation_checkpointing=False, init_seed=0,
                           seq_len=64).max_seq_len == 1024  # fmt: skip
    with pytest.raises(ConfigError, match="'parallel.ep_size': 5 does not divide"):
        cfg.model.build(
            512, ep_size=5, activation_checkpointing=False, init_seed=0, seq_len=64,
            keys={"ep_size": "parallel.ep_size"},
        )  # fmt: skip


def test_cli_refuses_a_cross_field_error_before_start_up(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sigma_moe", "train", str(REPO / "configs/test-tiny.yaml"),
         "--out", str(tmp_path / "run"), "--set", "model.router_topk=[1, 1, 1]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "config key 'model.router_topk': 3 entries for 2 layers" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_checks_the_batch_against_the_launchers_world_size(tmp_path):
    # test-tiny: global 4 = micro 4 x 1 process; under a 2-process launcher that cannot split.
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run(
        [sys.executable, "-m", "sigma_moe", "train", str(REPO / "configs/test-tiny.yaml"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert (
        "config key 'train.global_batch_size': 4 is not divisible by micro_batch_size" in r.stderr
    )
    assert not (tmp_path / "run").exists()
