import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from sigma_moe.rho1.compare import compare_stores
from sigma_moe.rho1.store import RefLossStore, StoreMetaError

S = 16


def _store(root, mode="w", **kw):
    args = dict(
        domain_names=["prose", "webnoise"],
        domain_sizes=[10, 5],
        seq_len=S,
        mode=mode,
        tokenizer_fingerprint="tokA",
        reference_fingerprint="refA",
    )
    args.update(kw)
    return RefLossStore(root, **args)


def test_partial_fill_and_reopen(tmp_path):
    st = _store(tmp_path)
    assert st.progress() == {"prose": (0, 10), "webnoise": (0, 5)}
    row = torch.linspace(0, 12, S)
    st.put("prose", 3, row)
    st.put(1, 4, row * 0.5)  # domain by id
    assert st.has("prose", 3) and not st.has("prose", 2)
    assert st.get("prose", 2) is None
    got = st.get("prose", 3)
    assert got.dtype == torch.float32
    assert torch.allclose(got, row, atol=1e-2)  # float16 storage
    assert st.missing([("prose", 3), ("prose", 4), ("webnoise", 4)]) == [("prose", 4)]
    st.close()
    # reopen read-only without knowing the domains
    ro = RefLossStore(tmp_path)
    assert ro.progress() == {"prose": (1, 10), "webnoise": (1, 5)}
    assert torch.equal(ro.get("prose", 3), got)
    with pytest.raises(PermissionError):
        ro.put("prose", 0, row)
    # reopen for writing, continue filling
    st = _store(tmp_path)
    st.put("prose", 4, row)
    assert st.count_done() == 3
    assert st.get_batch([("prose", 3), ("prose", 4)]).shape == (2, S)
    assert st.get_batch([("prose", 3), ("prose", 5)]) is None
    with pytest.raises(IndexError):
        st.get("webnoise", 5)
    with pytest.raises(KeyError):
        st.get("nope", 0)
    with pytest.raises(ValueError, match="seq_len"):
        st.put("prose", 0, torch.zeros(S + 1))


def test_float32_store(tmp_path):
    st = _store(tmp_path, dtype="float32")
    row = torch.randn(S)
    st.put("webnoise", 0, row)
    assert torch.equal(st.get("webnoise", 0), row)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"seq_len": S * 2}, "seq_len"),
        ({"tokenizer_fingerprint": "tokB"}, "tokenizer fingerprint"),
        ({"reference_fingerprint": "refB"}, "reference fingerprint"),
        ({"domain_sizes": [11, 5]}, "number of samples of domain 'prose'"),
    ],
)
def test_meta_mismatch(tmp_path, kw, match):
    _store(tmp_path).close()
    with pytest.raises(StoreMetaError, match=match) as ei:
        _store(tmp_path, **kw)
    assert str(tmp_path) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_missing_store_read_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="sigma-moe score"):
        RefLossStore(tmp_path / "nope")


def test_add_domain_on_reopen(tmp_path):
    _store(tmp_path).close()
    st = _store(tmp_path, domain_names=["prose", "webnoise", "math"], domain_sizes=[10, 5, 7])
    st.put("math", 6, torch.ones(S))
    assert RefLossStore(tmp_path).progress()["math"] == (1, 7)


def _writer(root, n, delay):
    st = RefLossStore(root, mode="w")
    for i in range(n):
        # each row is a constant = i + 1: a torn row would mix values
        st.put("prose", i, np.full(S, float(i + 1), dtype=np.float32))
        time.sleep(delay)
    st.close()


def test_concurrent_reader_writer(tmp_path):
    _store(tmp_path, domain_sizes=[200, 5]).close()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_writer, args=(str(tmp_path), 200, 0.001))
    p.start()
    ro = RefLossStore(tmp_path)
    seen = set()
    deadline = time.time() + 60
    while len(seen) < 200 and time.time() < deadline:
        for i in range(200):
            r = ro.get("prose", i)
            if r is not None:
                assert bool((r == i + 1).all()), f"torn row {i}: {r}"
                seen.add(i)
    p.join(30)
    assert p.exitcode == 0
    assert len(seen) == 200


def test_compare_stores(tmp_path):
    """Over the common rows only: loss differences on valid tokens and the selection change."""
    a = _store(tmp_path / "a", dtype="float32")
    b = _store(tmp_path / "b", dtype="float32", reference_fingerprint="refA:bf16")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        row = torch.rand(S, generator=g) * 5 + 1
        row[:2] = 0  # masked tokens
        a.put("prose", i, row)
        moved = row.clone()
        if i == 3:  # one row: its two best tokens for mode=reference (lowest loss) get worse
            best = torch.topk(-row[2:], 2).indices + 2
            moved[best] += 10.0
        b.put("prose", i, moved)
    a.put("prose", 9, torch.ones(S))  # only in a: not compared
    a.flush(), b.flush()
    r = compare_stores(tmp_path / "a", tmp_path / "b", ratio=0.5, batch=8)
    assert r["rows"] == 8 and r["tokens"] == 8 * (S - 2)
    assert r["abs_diff_max"] == pytest.approx(10.0)
    assert r["abs_diff_mean"] == pytest.approx(20.0 / (8 * (S - 2)))
    # the two tokens drop out of the batch's top half and two others come in: 4 changed
    assert r["selection_changed"] == pytest.approx(4 / (8 * (S - 2)))
    with pytest.raises(ValueError, match="no row in common"):
        compare_stores(tmp_path / "a", _store(tmp_path / "c").root)
    with pytest.raises(ValueError, match="seq_len"):
        compare_stores(tmp_path / "a", _store(tmp_path / "d", seq_len=S + 1).root)
    other = _store(tmp_path / "e", domain_identities=["prose|seed=9", "webnoise|seed=9"])
    with pytest.raises(ValueError, match="different samples of domain 'prose'"):
        compare_stores(tmp_path / "a", other.root)
