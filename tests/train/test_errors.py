"""Bad inputs fail with a message naming the problem and lose nothing: config keys (via the
CLI), missing/truncated datasets, a checkpoint of another model shape, a changed global batch,
NaN/Inf losses (skip, then stop with a checkpoint of the last good weights), a full disk while
saving (the previous checkpoint survives)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from _ckpt_util import REPO, baseline_run, config, train_in_process

from sigma_moe import cli
from sigma_moe.train.checkpoint import CheckpointError, load_full_state_dict, resolve_checkpoint

TINY = str(REPO / "configs" / "test-tiny.yaml")


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.max_stepz=3", ["train.max_stepz", "max_steps"]),
        ("train.lr=fast", ["train.lr", "number"]),
        ("parallel.zero_stage=3", ["parallel.zero_stage"]),
    ],
)
def test_cli_bad_config_key_exits_2_naming_it(tmp_path, capsys, override, names):
    rc = cli.main(["train", TINY, "--out", str(tmp_path / "r"), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2
    for n in names:
        assert n in err, err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_cli_unknown_key_in_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text() + "checkpoint: {evry: 5}\n")
    assert cli.main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "checkpoint.evry" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from sigma_moe.data.prepare import prepare_docs
    from sigma_moe.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("data")
    docs = [
        f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40 for i in range(40)
    ]
    train, _val = prepare_docs(docs, "toy", out, load_tokenizer("bundled"), val_fraction=0.1)
    return Path(train)


def _with_domain(prefix: Path):
    return config(
        f"data.domains=[{{name: toy, path: '{prefix}', weight: 1.0, clean: true}}]",
        "train.max_steps=2",
    )


def test_missing_dataset_files_are_named(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match=r"nothere.*\.bin") as e:
        train_in_process(_with_domain(prepared.parent / "nothere"), tmp_path / "r")
    assert "prepare-data" in str(e.value)


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_truncated_dataset_files_are_named(tmp_path, prepared, ext):
    d = tmp_path / "data"
    shutil.copytree(prepared.parent, d)
    prefix = d / prepared.name
    f = Path(str(prefix) + ext)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{f.name}.*truncated|truncated.*{f.name}"):
        train_in_process(_with_domain(prefix), tmp_path / "r")


def _copy_checkpoints(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(baseline_run() / "checkpoints", run / "checkpoints")
    return run


def test_resume_with_another_model_shape_names_checkpoint_and_key(tmp_path):
    run = _copy_checkpoints(tmp_path)
    with pytest.raises(ValueError) as e:
        train_in_process(config("model.num_layers=3"), run, resume="auto")
    msg = str(e.value)
    assert str(run / "checkpoints" / "step_00000007") in msg
    assert "model.num_layers: 2 in the checkpoint, 3 now" in msg
    assert "layers.2." in msg  # the parameters that do not exist in the checkpoint


def test_resume_with_changed_global_batch_is_refused(tmp_path):
    run = _copy_checkpoints(tmp_path)
    with pytest.raises(ValueError, match=r"train.global_batch_size.*trained with 4.*says 8"):
        train_in_process(config("train.global_batch_size=8"), run, resume="auto")
    # nothing lost: the checkpoints are untouched
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000007"


class _InjectNaN:
    """Makes the loss NaN at the given steps (forward hook) and snapshots the weights."""

    def __init__(self, steps):
        self.steps, self.active, self.weights = set(steps), False, {}

    def _hook(self, module, args, out):
        if self.active and out.loss_per_token is not None:
            out.loss_per_token = out.loss_per_token * float("nan")
        return out

    def on_train_start(self, trainer):
        trainer.model.register_forward_hook(self._hook)
        self.active = 1 in self.steps

    def on_step_end(self, trainer, m):
        self.weights[m["step"]] = {
            n: p.detach().clone() for n, p in trainer.model.named_parameters()
        }
        self.active = m["step"] + 1 in self.steps


def test_nan_loss_skips_then_stops_with_last_good_weights(tmp_path):
    from sigma_moe.train.loop import TrainingStopped

    inj = _InjectNaN({3, 4})
    cfg = config(
        "train.max_steps=6",
        "train.nan_policy=skip",
        "train.nan_max_skips=1",
        "train.eval_every=100",
        "checkpoint.keep_last=1",
    )
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 4.*step_00000004"):
        train_in_process(cfg, run, extra_callbacks=[inj])
    # step 3 was skipped: weights bitwise as after step 2
    w2, w3 = inj.weights[2], inj.weights[3]
    assert all(torch.equal(w2[n], w3[n]) for n in w2)
    assert not all(torch.equal(inj.weights[1][n], w2[n]) for n in w2)  # step 2 did train
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    flags = {m["step"]: m["nonfinite"] for m in lines if "nonfinite" in m}
    assert flags == {1: False, 2: False, 3: True}
    # the stop wrote a checkpoint of the last good weights; keep_last=1 pruned step 2
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004"]
    saved = load_full_state_dict(resolve_checkpoint(ck))
    assert all(torch.equal(saved[n], w2[n]) for n in w2)


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **kw):
        if "step_00000004" in str(f):
            calls.append(str(f))
            if len(calls) == 2:  # mid-save: after DeepSpeed wrote one file
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    cfg = config("train.max_steps=5", "train.eval_every=100")
    with pytest.raises(CheckpointError) as e:
        train_in_process(cfg, run)
    msg = str(e.value)
    assert "step_00000004" in msg and "No space left on device" in msg
    assert "disk full" in msg and "step_00000002 is intact" in msg
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000002"]
    assert resolve_checkpoint(ck) == ck / "step_00000002"
