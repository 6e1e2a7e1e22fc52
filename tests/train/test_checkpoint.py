"""Checkpoint layout, atomic publication and `--resume auto` skipping damaged checkpoints."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from _ckpt_util import baseline_run, config, losses, train_in_process

from sigma_moe.model import checkpoint_format
from sigma_moe.model.checkpoint_format import (
    META,
    checkpoint_problem,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
)
from sigma_moe.model.inference import load_model_for_inference
from sigma_moe.rho1.reference import load_reference


def test_checkpoint_contents():
    ck = baseline_run() / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000007"
    assert [p.name for p in list_checkpoints(ck)] == [
        "step_00000007",
        "step_00000006",
        "step_00000004",
        "step_00000002",
    ]
    assert not list(ck.glob("*.tmp-*"))
    c = ck / "step_00000007"
    meta = read_meta(c)
    assert meta["step"] == 7 and meta["consumed_samples"] == 28
    # the recipe's ZeRO-1 runs as ZeRO-0 on one process (nothing to shard; engine.py)
    assert meta["ep_size"] == 1 and meta["world_size"] == 1 and meta["zero_stage"] == 0
    assert meta["global_batch_size"] == 4 and meta["version"]
    assert meta["model_config"]["num_layers"] == 2
    # the manifest lists every file with its size
    files = {f.name: f.stat().st_size for f in c.iterdir() if f.name != META}
    assert meta["files"] == files
    assert {"config.yaml", "rng_rank0.pt", "mp_rank_00_model_states.pt"} <= set(files)
    assert "expp_rank_0_mp_rank_00_optim_states.pt" in files
    model, cfg, m = load_model_for_inference(ck)
    assert m["step"] == 7 and cfg["train"]["max_steps"] == 7


def test_resume_auto_skips_damaged_checkpoints(tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(baseline_run() / "checkpoints", run / "checkpoints")
    ck = run / "checkpoints"
    # newest: a truncated optimizer file; next: meta.json lost; next: a file missing
    opt = next((ck / "step_00000007").glob("*_rank_0_*optim_states.pt"))
    opt.write_bytes(opt.read_bytes()[:1000])
    (ck / "step_00000006" / META).unlink()
    assert "truncated" in checkpoint_problem(ck / "step_00000007")
    assert "no meta.json" in checkpoint_problem(ck / "step_00000006")
    assert resolve_checkpoint(ck) == ck / "step_00000004"
    err = capfd.readouterr().err
    assert f"skipping damaged checkpoint {ck / 'step_00000007'}" in err
    assert f"skipping damaged checkpoint {ck / 'step_00000006'}" in err

    # resume from step 4 and finish: same losses as the uninterrupted run; the damaged
    # checkpoints are replaced by good ones
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": v}) + "\n"
            for s, v in losses(baseline_run()).items()
            if s <= 4
        )
    )
    train_in_process(config(), run, resume="auto")
    err = capfd.readouterr().err
    assert f"[resume] from {ck / 'step_00000004'} (step 4)" in err
    assert losses(run) == losses(baseline_run())
    assert checkpoint_problem(ck / "step_00000007") is None
    assert checkpoint_problem(ck / "step_00000006") is None
    assert (ck / "latest").read_text().strip() == "step_00000007"
    assert not list(ck.glob("*.old-*")) and not list(ck.glob("*.tmp-*"))


def test_resume_path_to_damaged_checkpoint_is_an_error(tmp_path):
    import pytest

    c = tmp_path / "step_00000002"
    shutil.copytree(baseline_run() / "checkpoints" / "step_00000002", c)
    (c / "rng_rank0.pt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"step_00000002 cannot be loaded: rng_rank0.pt is missing"
    ):
        resolve_checkpoint(c)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    import pytest

    ck = tmp_path / "checkpoints"
    shutil.copytree(baseline_run() / "checkpoints" / "step_00000002", ck / "step_00000002")
    (ck / "step_00000002" / META).unlink()
    (ck / "step_00000004.tmp-123").mkdir()  # an interrupted save is not a candidate
    with pytest.raises(FileNotFoundError, match=r"no loadable checkpoint under .*every candidate"):
        resolve_checkpoint(ck)


def test_inference_load_hashes_each_file_once_and_refuses_damage(tmp_path, monkeypatch):
    """`load_model_for_inference` and the Rho-1 reference loader check the manifest once (each
    file's sha256, ~1.5 s per GB): before, `resolve_checkpoint` ran twice (three times for the
    reference). A damaged file is still refused, naming it."""
    src = baseline_run() / "checkpoints" / "step_00000007"
    hashed: Counter[str] = Counter()
    real = checkpoint_format.file_sha256

    def counting(f):
        hashed[f.name] += 1
        return real(f)

    monkeypatch.setattr(checkpoint_format, "file_sha256", counting)
    model, cfg, meta = load_model_for_inference(src)
    assert meta["step"] == 7 and cfg["train"]["max_steps"] == 7
    assert set(hashed) == set(meta["checksums"]) and set(hashed.values()) == {1}
    hashed.clear()  # the Rho-1 reference loader resolves first (tokenizer check): it hashed 3x
    assert load_reference(src).path == str(src)
    assert set(hashed) == set(meta["checksums"]) and set(hashed.values()) == {1}
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    with open(bad / "mp_rank_00_model_states.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    with pytest.raises(
        FileNotFoundError, match="mp_rank_00_model_states.pt does not match its sha256"
    ):
        load_model_for_inference(bad)
