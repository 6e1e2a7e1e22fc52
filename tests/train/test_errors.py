"""Bad inputs fail with a message naming the problem and lose nothing: config keys (via the
CLI), missing/truncated datasets, a checkpoint of another model shape, a changed global batch,
NaN/Inf losses (skip, then stop with a checkpoint of the last good weights), a full disk while
saving (the previous checkpoint survives)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from _ckpt_util import REPO, baseline_run, config, train_in_process

from sigma_moe import cli
from sigma_moe.errors import CheckpointError
from sigma_moe.model.checkpoint_format import resolve_checkpoint
from sigma_moe.model.checkpoint_io import load_full_state_dict

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


# --------------------------------------------------------------------------- issue 15 probe
# One row per case of the bad-input / fault probe (issue 15); docs/errors.md lists each row's
# message. Every row failed before its fix.


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (DeepSpeed, a baseline run's summary)
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _flip_tensor_bytes(pt: Path) -> None:
    """Same-size damage inside the largest tensor record of a torch archive (the zip directory
    and the file size stay valid: the old size check passed it)."""
    import zipfile

    with zipfile.ZipFile(pt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(pt.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + min(64, info.file_size)):
        raw[i] ^= 0x5A
    pt.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """A copy of the baseline's checkpoints whose newest one has a damaged weight record."""
    ck = tmp_path_factory.mktemp("damaged") / "run" / "checkpoints"
    shutil.copytree(baseline_run() / "checkpoints", ck)
    _flip_tensor_bytes(ck / "step_00000007" / "mp_rank_00_model_states.pt")
    return ck


SHA = "mp_rank_00_model_states.pt does not match its sha256"


def case_damaged_eval(tmp_path, capsys, damaged):
    rc, _, err = _run_cli(capsys, "eval", damaged / "step_00000007")
    assert rc == 2 and SHA in err and "clean_val_loss" not in err


def case_damaged_generate(tmp_path, capsys, damaged):
    rc, out, err = _run_cli(capsys, "generate", damaged / "step_00000007", "--prompt", "In")
    assert rc == 2 and SHA in err and out == ""


def case_damaged_convert(tmp_path, capsys, damaged):
    rc, _, err = _run_cli(
        capsys, "convert-checkpoint", damaged / "step_00000007", tmp_path / "u", "--ep-size", "1"
    )
    assert rc == 2 and SHA in err and not (tmp_path / "u").exists()


def case_damaged_reference(tmp_path, capsys, damaged):
    sets = ["rho1.mode=excess", f"rho1.reference={damaged / 'step_00000007'}"]
    rc, _, err = _run_cli(
        capsys, "train", TINY, "--out", tmp_path / "r", "--set", *sets[:1], "--set", sets[1]
    )
    assert rc == 2 and SHA in err and not (tmp_path / "r").exists()  # refused before any build


def case_damaged_resume_skips(tmp_path, capsys, damaged):
    assert resolve_checkpoint(damaged) == damaged / "step_00000006"
    assert (
        f"skipping damaged checkpoint {damaged / 'step_00000007'}: {SHA}" in capsys.readouterr().err
    )


def case_damaged_old_manifest_crc(tmp_path, capsys, damaged):
    """A checkpoint from before the checksums: the zip entries' CRC32 catch the same damage."""
    from sigma_moe.model.checkpoint_format import checkpoint_problem

    c = tmp_path / "step_00000007"
    shutil.copytree(damaged / "step_00000007", c)
    meta = json.loads((c / "meta.json").read_text())
    del meta["checksums"]
    (c / "meta.json").write_text(json.dumps(meta))
    assert "fails its CRC check" in checkpoint_problem(c)


def case_second_run_refused_dead_holder_not(tmp_path, capsys, damaged):
    import subprocess

    from _ckpt_util import PY, subprocess_env

    from sigma_moe.train.runlock import RunLock

    run = tmp_path / "r"
    code = (
        "import sys, time; from sigma_moe.train.runlock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [PY, "-c", code, str(run)], stdout=subprocess.PIPE, env=subprocess_env()
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        rc, _, err = _run_cli(capsys, "train", TINY, "--out", run)
        assert rc == 2 and f"is in use by another run (pid {holder.pid} on" in err, err
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.wait()
    with RunLock(run) as lock:  # a dead holder leaves nothing stuck
        assert lock.path.read_text().startswith(f"pid {os.getpid()} ")


def case_lr_inf_rejected(tmp_path, capsys, damaged):
    rc, _, err = _run_cli(capsys, "train", TINY, "--out", tmp_path / "r", "--set", "train.lr=.inf")
    assert rc == 2 and "config key 'train.lr': must be a finite number, got inf" in err


def case_nonfinite_weights_never_called_good(tmp_path, capsys, damaged, monkeypatch):
    """What `train.lr=.inf` did before the config refused it: an Inf learning rate at the 3rd
    step turns the weights Inf/NaN, the 4th step's loss is NaN, the NaN stop saves."""
    from sigma_moe.train import loop
    from sigma_moe.train.loop import TrainingStopped

    real_lr = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda t, s: float("inf") if s == 2 else real_lr(t, s))
    run = tmp_path / "run"
    cfg = config("train.max_steps=6", "train.nan_policy=stop", "train.eval_every=100")
    with pytest.raises(TrainingStopped) as e:
        train_in_process(cfg, run)
    msg = str(e.value)
    assert "non-finite loss at step 4" in msg and "weights at step 4 are not finite" in msg
    assert "last good weights" not in msg and "step_00000002 is intact" in msg
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"]  # no NaN checkpoint
    state = load_full_state_dict(resolve_checkpoint(ck))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(
    "args, names",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "In", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--prompt", "In", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--prompt", "In", "--max-new-tokens", "-5"], "--max-new-tokens must be in [1, 4096]"),
        (
            ["--prompt", "In", "--max-new-tokens", "1000000"],
            "--max-new-tokens must be in [1, 4096]",
        ),
    ],
    ids=[
        "empty-prompt",
        "temperature-nan",
        "temperature-negative",
        "max-new-negative",
        "max-new-huge",
    ],
)
def test_issue15_generate_bad_args(tmp_path, capsys, args, names):
    rc, out, err = _run_cli(capsys, "generate", baseline_run() / "checkpoints", *args)
    assert rc == 2 and names in err and out == ""


def case_generate_streams_and_ctrl_c_keeps_output(tmp_path, capsys, damaged):
    from sigma_moe.train import evaluate

    ck = baseline_run() / "checkpoints"
    pieces = list(evaluate.stream_text(ck, "In the", 12, 0.8, 0))
    assert pieces[0] == "In the" and len(pieces) >= 3  # the prompt, then token by token
    real = evaluate.stream_text

    def interrupted(*a):
        gen = real(*a)
        yield next(gen)
        yield next(gen)
        raise KeyboardInterrupt

    evaluate.stream_text = interrupted
    try:
        rc, out, err = _run_cli(
            capsys, "generate", ck, "--prompt", "In the", "--max-new-tokens", "12"
        )
    finally:
        evaluate.stream_text = real
    assert rc == 130 and out.startswith("In the" + pieces[1]) and "interrupted" in err


def case_train_out_is_a_file(tmp_path, capsys, damaged):
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc, _, err = _run_cli(capsys, "train", TINY, "--out", f)
    assert rc == 2 and "is an existing file, not a folder" in err and f.read_text() == "keep me"


def _prepare(capsys, inp: Path, out: Path, *extra) -> tuple[int, str]:
    rc, _, err = _run_cli(
        capsys, "prepare-data", "--input", inp, "--domain", "d", "--out", out, *extra
    )
    return rc, err


def case_prepare_out_is_a_file(tmp_path, capsys, damaged):
    (tmp_path / "in.txt").write_text("a document\n\nanother one\n")
    (tmp_path / "afile").write_text("x")
    rc, err = _prepare(capsys, tmp_path / "in.txt", tmp_path / "afile")
    assert rc == 2 and f"--out '{tmp_path / 'afile'}'" in err
    assert "is an existing file, not a folder" in err and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("kind", ["missing", "not-a-checkpoint", "other-tokenizer"])
def test_issue15_bad_reference_refused_before_build(tmp_path, capsys, kind):
    ref = tmp_path / "ref"
    if kind == "not-a-checkpoint":
        ref.mkdir()
        (ref / "notes.txt").write_text("x")
    elif kind == "other-tokenizer":
        shutil.copytree(baseline_run() / "checkpoints" / "step_00000007", ref)
        meta = json.loads((ref / "meta.json").read_text())
        meta["tokenizer_fingerprint"] = "0" * 64
        (ref / "meta.json").write_text(json.dumps(meta))
    sets = ["--set", "rho1.mode=excess", "--set", f"rho1.reference={ref}"]
    rc, _, err = _run_cli(capsys, "train", TINY, "--out", tmp_path / "r", *sets)
    want = {
        "missing": "does not exist",
        "not-a-checkpoint": "neither a checkpoint of ours",
        "other-tokenizer": "same tokenizer",
    }
    assert rc == 2 and want[kind] in err and f"rho1.reference '{ref}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "r").exists()  # nothing was built or written


def case_non_utf8_input_named(tmp_path, capsys, damaged):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "good.txt").write_text("fine text\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    rc, err = _prepare(capsys, d, tmp_path / "o")
    assert rc == 2 and "latin1.txt' is not UTF-8 text (byte 0xe9" in err


def case_binary_tokenizer_named(tmp_path, capsys, damaged):
    (tmp_path / "in.txt").write_text("a document\n")
    (tmp_path / "tok.bin").write_bytes(bytes(range(256)))
    rc, err = _prepare(
        capsys, tmp_path / "in.txt", tmp_path / "o", "--tokenizer", tmp_path / "tok.bin"
    )
    assert rc == 2 and "tok.bin' is not a tokenizer.json (not UTF-8" in err


def case_beta1_range(tmp_path, capsys, damaged):
    rc, _, err = _run_cli(
        capsys, "train", TINY, "--out", tmp_path / "r", "--set", "train.beta1=1.5"
    )
    assert rc == 2 and "config key 'train.beta1': must be in [0, 1)" in err


def case_topk_schedule_bound_at_load(tmp_path, capsys, damaged):
    sched = "model.topk_schedule=[{until_step: 3, layers: [0], topk: 99}]"
    rc, _, err = _run_cli(capsys, "train", TINY, "--out", tmp_path / "r", "--set", sched)
    assert rc == 2 and "config key 'model.topk_schedule[0].topk': must be in [1, " in err
    assert not (tmp_path / "r").exists()  # no "0 steps" summary or plots left behind


def case_empty_yaml_refused(tmp_path, capsys, damaged):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing\n")
    rc, _, err = _run_cli(capsys, "train", empty, "--out", tmp_path / "r")
    assert rc == 2 and f"config file {empty} is empty" in err and not (tmp_path / "r").exists()


def case_stopped_run_summary_says_no_final_eval(tmp_path, capsys, damaged):
    from _ckpt_util import Signal

    from sigma_moe.train.callbacks import StageInterrupted, format_summary, require_complete

    run = tmp_path / "run"
    s = train_in_process(config("train.eval_every=100"), run, extra_callbacks=[Signal(3, 15)])
    assert (s["steps"], s["complete"], s["stopped_by"], s["final_eval"]) == (
        3,
        False,
        "SIGTERM",
        False,
    )
    text = format_summary(s)
    assert "no final evaluation ran: the last one was at step 0" in text and "fell" not in text
    assert "stopped (SIGTERM) at step 3 of 7: continue with --resume auto" in text
    assert json.loads((run / "summary.json").read_text())["complete"] is False
    with pytest.raises(StageInterrupted, match="stopped \\(SIGTERM\\) at step 3 of 7"):
        require_complete(s, "x", run, "again")


class _TwoSigints:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, m):
        if m["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # recorded: stop after this step, checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # a forwarded copy of the same Ctrl-C: ignored
            time.sleep(0.6)  # past checkpoint._REPEAT_S: a second Ctrl-C of the user's
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once


def case_second_ctrl_c_stops_at_once(tmp_path, capsys, damaged):
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        train_in_process(config(), run, extra_callbacks=[_TwoSigints(3)])
    assert signal.getsignal(signal.SIGINT) is before  # the run's handlers are gone
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"]


def _stopping_run_training(monkeypatch, at_step, swap_cfg=None):
    """run_training as the multi-stage commands call it, but SIGTERM after `at_step` of the
    first stage (as a user's Ctrl-C or a timeout would) and, optionally, a tiny config."""
    from _ckpt_util import Signal

    from sigma_moe.train import loop

    real, calls = loop.run_training, []

    def run_training(cfg, out, resume="none", extra_callbacks=None, **kw):
        calls.append(Path(out).name)
        extra = list(extra_callbacks or []) + ([Signal(at_step, 15)] if len(calls) == 1 else [])
        return real(swap_cfg or cfg, out, resume=resume, extra_callbacks=extra, **kw)

    monkeypatch.setattr(loop, "run_training", run_training)
    return calls


def case_demo_stops_whole_command_then_resumes(tmp_path, capsys, damaged, monkeypatch):
    from sigma_moe.experiments import demo
    from sigma_moe.experiments import rho1 as experiment
    from sigma_moe.train.callbacks import StageInterrupted

    monkeypatch.setattr(demo, "config_path", lambda name: Path(TINY))
    monkeypatch.setattr(experiment, "run_rho1_experiment", lambda *a, **k: pytest.fail("ran on"))
    calls = _stopping_run_training(monkeypatch, 2)
    out = tmp_path / "demo"
    with pytest.raises(StageInterrupted) as e:
        demo.run_demo(out, steps=4, rho1=True)
    msg = str(e.value)
    assert "stage 'demo-cpu MoE' stopped (SIGTERM) at step 2 of 4" in msg
    assert f"sigma-moe demo --out {out} --steps 4 --resume auto" in msg
    assert calls == ["moe"] and not (out / "demo_summary.json").exists()
    res = demo.run_demo(out, steps=4, rho1=False, resume="auto")  # the hint's command goes on
    assert res["moe"]["complete"] and res["moe"]["steps"] == 4
    assert json.loads((out / "demo_summary.json").read_text())["moe"]["final_eval"]


def case_rho1_experiment_stopped_stage_writes_no_results(tmp_path, capsys, damaged, monkeypatch):
    from sigma_moe.experiments.rho1 import run_rho1_experiment
    from sigma_moe.train.callbacks import StageInterrupted

    calls = _stopping_run_training(monkeypatch, 2, swap_cfg=config("train.max_steps=3"))
    out = tmp_path / "rho1"
    ref = baseline_run() / "checkpoints"
    with pytest.raises(
        StageInterrupted, match="stage 'target CLM .*' stopped \\(SIGTERM\\) at step 2 of 3"
    ):
        run_rho1_experiment(out, steps=3, reference=ref, progress=False)
    assert calls == ["clm"]  # the later stages never started
    assert not (out / "rho1_results.json").exists() and not (out / "rho1_table.md").exists()


CASES = {
    "1-damaged-checkpoint-eval": case_damaged_eval,
    "1-damaged-checkpoint-generate": case_damaged_generate,
    "1-damaged-checkpoint-convert": case_damaged_convert,
    "1-damaged-checkpoint-as-reference": case_damaged_reference,
    "1-damaged-checkpoint-resume-skips-it": case_damaged_resume_skips,
    "1-damaged-checkpoint-old-manifest-crc": case_damaged_old_manifest_crc,
    "2-second-run-into-one-out": case_second_run_refused_dead_holder_not,
    "3-lr-inf": case_lr_inf_rejected,
    "3-nonfinite-weights-not-saved-as-good": case_nonfinite_weights_never_called_good,
    "4-generate-streams-ctrl-c-keeps-output": case_generate_streams_and_ctrl_c_keeps_output,
    "5-train-out-is-a-file": case_train_out_is_a_file,
    "5-prepare-out-is-a-file": case_prepare_out_is_a_file,
    "6-non-utf8-input-file": case_non_utf8_input_named,
    "6-binary-tokenizer": case_binary_tokenizer_named,
    "6-beta1-out-of-range": case_beta1_range,
    "6-topk-schedule-topk-99": case_topk_schedule_bound_at_load,
    "7-empty-yaml": case_empty_yaml_refused,
    "8-demo-ctrl-c-stops-all-stages": case_demo_stops_whole_command_then_resumes,
    "8-rho1-experiment-stopped-stage-no-results": case_rho1_experiment_stopped_stage_writes_no_results,
    "8-second-ctrl-c-at-once": case_second_ctrl_c_stops_at_once,
    "9-stopped-run-summary": case_stopped_run_summary_says_no_final_eval,
}


@pytest.mark.parametrize("case", list(CASES))
def test_issue15_case(case, tmp_path, capsys, damaged, monkeypatch):
    fn = CASES[case]
    kw = {"monkeypatch": monkeypatch} if "monkeypatch" in fn.__code__.co_varnames else {}
    fn(tmp_path, capsys, damaged, **kw)
