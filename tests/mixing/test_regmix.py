"""RegMix search on a toy loss surface with a known best mixture; resumable proxies."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import yaml

from sigma_moe.config import DomainConfig
from sigma_moe.mixing.regmix import SearchSpec, fit_and_propose, run_proxies, write_outputs

BEST = np.array([0.5, 0.3, 0.2])
NAMES = ["a", "b", "c"]


def toy(mix, i, folder):
    """A bowl with its minimum at BEST for domain a, flat-ish for the others, plus noise."""
    rng = np.random.default_rng(i)
    bowl = float(((mix - BEST) ** 2 * np.array([4.0, 6.0, 5.0])).sum())
    return {"a": 3.0 + bowl + 0.002 * rng.standard_normal(), "b": 4.0, "c": 5.0 + mix[2]}


def _spec(**kw):
    return SearchSpec("toy.yaml", NAMES, [0.4, 0.4, 0.2], ["a"], **kw)


def test_search_recovers_the_best_mixture_of_a_toy_surface(tmp_path):
    spec = _spec(num_proxies=48)
    mixes, losses = run_proxies(spec, tmp_path, toy, parallel=2, progress=False)
    res = fit_and_propose(spec, mixes, losses, "quadratic")
    got = np.array([res["proposed"][n] for n in NAMES])
    assert np.abs(got - BEST).max() < 0.05, got
    assert res["cv_spearman"] > 0.9
    # the proposal beats the best proxy it was fitted on, and uniform, on the true surface
    assert toy(got, 0, None)["a"] < res["best_proxy_loss"] + 0.004
    assert toy(got, 0, None)["a"] < toy(np.full(3, 1 / 3), 0, None)["a"]

    frag = write_outputs(spec, tmp_path, res, [DomainConfig(n, "bundled") for n in NAMES])
    doms = yaml.safe_load(frag.read_text())["data"]["domains"]
    assert [d["name"] for d in doms] == NAMES
    assert [d["weight"] for d in doms] == pytest.approx(got.tolist(), abs=1e-5)
    assert (tmp_path / "plots" / "regmix_fit.png").stat().st_size > 1000


def test_a_killed_search_continues(tmp_path):
    calls = []

    def flaky(mix, i, folder):
        calls.append(i)
        if len(calls) > 5:
            raise KeyboardInterrupt("killed")
        return toy(mix, i, folder)

    spec = _spec(num_proxies=8)
    with pytest.raises(KeyboardInterrupt):
        run_proxies(spec, tmp_path, flaky, parallel=1, progress=False)
    done = [json.loads(x)["proxy"] for x in (tmp_path / "proxies.jsonl").read_text().splitlines()]
    assert len(done) == 5
    calls.clear()
    mixes, losses = run_proxies(spec, tmp_path, toy_counting(calls), parallel=1, progress=False)
    assert sorted(calls) == sorted(set(range(8)) - set(done)) and len(losses) == 8
    with pytest.raises(ValueError, match="other settings"):
        run_proxies(_spec(num_proxies=9), tmp_path, toy, progress=False)


def toy_counting(calls):
    def f(mix, i, folder):
        calls.append(i)
        return toy(mix, i, folder)

    return f


@pytest.mark.slow
def test_proxy_pool_trains_real_proxies_two_at_a_time(tmp_path, monkeypatch):
    """The default train function: warm worker processes training proxies with this trainer.
    The parent's rendezvous port is taken (as after an in-process training in CI's pytest
    process): the proxies must not inherit it."""
    held = socket.socket()
    held.bind(("", 0))
    held.listen()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
    from sigma_moe.mixing.regmix import DEFAULT_PROXY_SETS, ProxyPool

    sets = [*DEFAULT_PROXY_SETS, "train.max_steps=6", "train.eval_every=6", "train.log_every=3"]
    sets.append("data.val_samples_per_domain=2")
    names = ["prose", "code", "math", "webnoise"]
    spec = SearchSpec("configs/test-tiny.yaml", names, [0.25] * 4, ["prose"], 3, 0, sets)
    with ProxyPool(spec, threads=1, parallel=2) as pool:
        started = set(pool.pool._processes)  # the two workers ProxyPool started
        mixes, losses = run_proxies(spec, tmp_path, pool, parallel=2, progress=False)
        after = set(pool.pool._processes)
    # two long-lived workers served three proxies: none died, none was added (a probe with
    # pool.map(_worker_ready, ...) was flaky: one idle worker can take all the tiny tasks)
    assert len(losses) == 3 and len(started) == 2 and after == started
    for i, lv in enumerate(losses):
        assert set(lv) == set(names)
        assert all(4.0 < v < 9.5 for v in lv.values()), lv  # trained from ln(vocab) ≈ 9.0
        proxy = yaml.safe_load((tmp_path / "proxies" / f"{i:03d}" / "proxy.yaml").read_text())
        w = [d["weight"] for d in proxy["data"]["domains"]]
        assert w == pytest.approx(mixes[i].tolist(), abs=1e-12)
        assert "val_loss" in (tmp_path / "proxies" / f"{i:03d}" / "train.log").read_text()
    # different mixtures, different losses (real training, not a fixed number)
    assert len({round(lv["prose"], 6) for lv in losses}) == 3
