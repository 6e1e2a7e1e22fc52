import os
import time

import pytest
import torch

import sigma_moe.rho1.scorer as scorer_mod
from sigma_moe.config import RunConfig
from sigma_moe.rho1.callback import Rho1Callback
from sigma_moe.rho1.score_cli import main
from sigma_moe.rho1.scorer import (
    ScorerError,
    ScorerSupervisor,
    build_dataset,
    resolve_mode,
    score_samples,
)
from sigma_moe.rho1.store import RefLossStore

G, MB, STEPS = 8, 4, 4


def _cfg(reference, **rho1):
    cfg = RunConfig()
    cfg.data.seq_len = 64
    cfg.train.max_steps = STEPS
    cfg.train.global_batch_size = G
    cfg.train.micro_batch_size = MB
    cfg.rho1.mode = "excess"
    cfg.rho1.reference = str(reference)
    cfg.rho1.scorer_batch_size = 4
    cfg.rho1.scorer_lookahead = 8
    cfg.rho1.scorer_timeout_s = 60.0
    for k, v in rho1.items():
        setattr(cfg.rho1, k, v)
    return cfg.validate()


@pytest.fixture(scope="module")
def ds(hf_reference):
    return build_dataset(_cfg(hf_reference))


def _keys(ds, step):
    return [ds.domain_and_index(g) for g in range(step * G, (step + 1) * G)]


def _train_like(sup, ds):
    """What the trainer does: advance to its position, then wait for each step's rows."""
    out = []
    for step in range(STEPS):
        sup.advance(step * G)
        out.append(sup.wait_for(_keys(ds, step)))
    return torch.cat(out)


def test_inline_matches_direct_scoring(hf_reference, ds, tmp_path):
    from sigma_moe.rho1.reference import load_reference

    cfg = _cfg(hf_reference, scorer="inline")
    with ScorerSupervisor(cfg, tmp_path / "store", dataset=ds) as sup:
        rows = _train_like(sup, ds)
        assert sup.store.count_done() == len({k for s in range(STEPS) for k in _keys(ds, s)})
    ref = load_reference(hf_reference)
    want = score_samples(ref, [ds[g] for g in range(STEPS * G)])
    assert torch.allclose(rows, want, atol=2e-2, rtol=2e-3)  # float16 store
    assert rows.shape == (STEPS * G, 64) and (rows >= 0).all()


def test_bf16_reference_in_the_side_process(hf_reference, ds, tmp_path):
    """rho1.reference_dtype reaches the side process (it reads the run config): its store is
    fingerprinted as bf16, its rows match inline bf16 scoring, and a prefilled run with an fp32
    reference refuses that store."""
    cfg16 = _cfg(hf_reference, scorer="process", reference_dtype="bf16")
    with ScorerSupervisor(cfg16, tmp_path / "p", dataset=ds) as sup:
        got = _train_like(sup, ds)
        assert sup.store.meta["reference_fingerprint"].endswith(":bf16")
    cfg16i = _cfg(hf_reference, scorer="inline", reference_dtype="bf16")
    with ScorerSupervisor(cfg16i, tmp_path / "i", dataset=ds) as sup:
        want = _train_like(sup, ds)
    # float16 store, and the two sides run bf16 GEMMs on different thread counts
    assert (got - want).abs().max() < 0.05 and (got - want).abs().mean() < 5e-3
    with ScorerSupervisor(_cfg(hf_reference, scorer="inline"), tmp_path / "f", dataset=ds) as sup:
        fp32 = _train_like(sup, ds)
    assert not torch.equal(got, fp32)
    # the bf16 store serves a bf16 prefilled run, and refuses an fp32 one, naming the setting
    pre16 = _cfg(hf_reference, scorer="prefilled", reference_dtype="bf16")
    with ScorerSupervisor(pre16, tmp_path / "p", dataset=ds) as sup:
        assert torch.equal(_train_like(sup, ds), got)
    with pytest.raises(ScorerError, match="rho1.reference_dtype=bf16 reuses this store"):
        ScorerSupervisor(_cfg(hf_reference, scorer="prefilled"), tmp_path / "p", dataset=ds).start()
    # without the reference's folder, the dtype alone is still checked
    gone = _cfg(tmp_path / "moved-away", scorer="prefilled")
    with pytest.raises(ScorerError, match="scored by a bf16 reference"):
        ScorerSupervisor(gone, tmp_path / "p", dataset=ds).start()


def test_process_crash_restart_same_losses(hf_reference, ds, tmp_path):
    inline = ScorerSupervisor(_cfg(hf_reference, scorer="inline"), tmp_path / "a", dataset=ds)
    with inline:
        want = _train_like(inline, ds)
    cfg = _cfg(hf_reference, scorer="process", scorer_max_restarts=2, scorer_nice=7)
    sup = ScorerSupervisor(cfg, tmp_path / "b", dataset=ds, fault_injection={"crash_after_rows": 8})
    t0 = time.monotonic()
    with sup:
        got = _train_like(sup, ds)
        assert sup.restarts >= 1  # (2 if a loaded machine also trips the no-progress timeout)
        assert sup.wait_s_total > 0
        # the restarted side process runs at rho1.scorer_nice below the trainer too
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, sup._proc.pid) == min(mine + 7, 19)
    assert time.monotonic() - t0 < 600  # bounded: never a hang
    assert torch.equal(got, want)  # bit-identical rows after a crash + resume from the store


def test_unstartable_scorer_fails_fast(hf_reference, ds, tmp_path):
    # missing path: refused before spawning anything
    cfg = _cfg(tmp_path / "no-such-model", scorer="process")
    t0 = time.monotonic()
    with pytest.raises(ScorerError, match="does not exist"):
        ScorerSupervisor(cfg, tmp_path / "s", dataset=ds).start()
    assert time.monotonic() - t0 < 5


def test_tokenizer_mismatch_refused_before_spawn(ds, tmp_path):
    import json

    from _rho1_helpers import make_hf_reference

    from sigma_moe.data.tokenizer import BUNDLED_TOKENIZER_PATH

    raw = json.loads(BUNDLED_TOKENIZER_PATH.read_text())
    vocab = raw["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tok.json").write_text(json.dumps(raw))
    bad = make_hf_reference(tmp_path / "bad", tokenizer_json=tmp_path / "tok.json")
    cfg = _cfg(bad, scorer="process", scorer_max_restarts=3)
    sup = ScorerSupervisor(cfg, tmp_path / "s", dataset=ds)
    t0 = time.monotonic()
    with pytest.raises(ScorerError, match="cannot start.*fingerprint"):
        sup.start()
    assert time.monotonic() - t0 < 5
    assert sup._proc is None
    sup.close()


def test_side_process_setup_failure_is_reported(hf_reference, ds, tmp_path):
    """A reference that passes the cheap checks but cannot be loaded (corrupt weights): the side
    process reports the error, the supervisor raises at once (no retries: restarting cannot fix a
    broken reference), within bounded time."""
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(hf_reference, bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    cfg = _cfg(bad, scorer="process", scorer_max_restarts=3, scorer_timeout_s=120.0)
    sup = ScorerSupervisor(cfg, tmp_path / "s", dataset=ds)
    t0 = time.monotonic()
    with pytest.raises(ScorerError, match="could not start") as ei:
        sup.start()
    assert str(bad) in str(ei.value)
    assert time.monotonic() - t0 < 120
    assert sup.restarts == 0
    sup.close()


def test_prefilled_and_cli(hf_reference, ds, tmp_path, capsys):
    import yaml

    cfg = _cfg(hf_reference, scorer="prefilled")
    store = tmp_path / "store"
    # nothing there yet
    with pytest.raises(ScorerError, match="sigma-moe score"):
        ScorerSupervisor(cfg, store, dataset=ds).start()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    rc = main([str(cfg_path), "--store", str(store), "--num-samples", str(G), "--no-progress"])
    assert rc == 0 and "scored" in capsys.readouterr().out
    with ScorerSupervisor(cfg, store, dataset=ds) as sup:
        assert sup.wait_for(_keys(ds, 0)).shape == (G, 64)
        missing = [k for k in _keys(ds, 1) if not sup.store.has(*k)]
        assert missing
        with pytest.raises(ScorerError, match="lacks"):
            sup.wait_for(_keys(ds, 1))
    # the store remembers the reference: a different one is refused
    assert RefLossStore(store).meta["reference_fingerprint"].startswith("transformers:")
    # `sigma-moe score` applies rho1.reference_dtype from the run's config
    cfg16 = _cfg(hf_reference, scorer="prefilled", reference_dtype="bf16")
    cfg_path.write_text(yaml.safe_dump(cfg16.to_dict()))
    store16 = tmp_path / "store16"
    assert (
        main([str(cfg_path), "--store", str(store16), "--num-samples", "4", "--no-progress"]) == 0
    )
    assert RefLossStore(store16).meta["reference_fingerprint"].endswith(":bf16")


@pytest.mark.slow
def test_hung_scorer_is_restarted(hf_reference, ds, tmp_path):
    cfg = _cfg(hf_reference, scorer="process", scorer_timeout_s=3.0, scorer_max_restarts=1)
    sup = ScorerSupervisor(cfg, tmp_path / "s", dataset=ds, fault_injection={"hang_after_rows": 4})
    with sup:
        _train_like(sup, ds)
        assert sup.restarts == 1


_ORPHAN_SCRIPT = """
import sys, time, yaml
from sigma_moe.config import config_from_dict
from sigma_moe.rho1.scorer import ScorerSupervisor

if __name__ == "__main__":  # spawn re-imports the main module
    cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
    sup = ScorerSupervisor(cfg, sys.argv[2]).start()
    print("PID", sup._proc.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_scorer_exits_when_trainer_is_killed(hf_reference, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    cfg = _cfg(hf_reference, scorer="process")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "t.py").write_text(_ORPHAN_SCRIPT)
    p = subprocess.Popen(
        [sys.executable, str(tmp_path / "t.py"), str(tmp_path / "c.yaml"), str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = ""
    while not line.startswith("PID "):
        line = p.stdout.readline()
        assert line, "the helper exited before starting the scorer"
    child = int(line.split()[1])
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the scorer outlived its killed trainer")


@pytest.mark.parametrize(
    "env,cuda,want",
    [
        ({"OMP_NUM_THREADS": "4"}, False, "inline"),  # one trainer holds the 4 cores
        ({}, False, "inline"),  # torch's own thread count: 4 (patched below)
        ({"OMP_NUM_THREADS": "2"}, False, "process"),  # two cores left for the scorer
        ({"OMP_NUM_THREADS": "4", "LOCAL_WORLD_SIZE": "2"}, False, "process"),  # one per node
        ({"OMP_NUM_THREADS": "4"}, True, "process"),  # the scorer on the GPU
    ],
)
def test_auto_scorer_resolves_from_the_cores_the_trainer_holds(monkeypatch, env, cuda, want):
    monkeypatch.setattr(scorer_mod._threads, "cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_mode("auto", env) == want
    for mode in ("process", "inline", "prefilled"):  # an explicit choice is kept
        assert resolve_mode(mode, env) == mode


def test_auto_is_the_default_and_the_callback_runs_the_resolved_mode(
    hf_reference, tmp_path, monkeypatch
):
    cfg = _cfg(hf_reference)
    assert cfg.rho1.scorer == "auto"
    monkeypatch.setattr(scorer_mod._threads, "cores", lambda: 1)  # the trainer holds every core
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cb = Rho1Callback(cfg.rho1, tmp_path, run_config=cfg)
    assert cb.r.scorer == "inline" and cfg.rho1.scorer == "auto"  # the config is not mutated
    sup = ScorerSupervisor(cfg, tmp_path / "store")
    assert sup.mode == "inline"
