import json

import numpy as np
import pytest

from sigma_moe.data.prepare import (
    check_prefix,
    main,
    prepare_data,
    read_index_header,
    train_tokenizer_main,
)
from sigma_moe.data.tokenizer import load_tokenizer


def _make_inputs(root, n=40):
    root.mkdir(parents=True, exist_ok=True)
    docs = [f"Document number {i}.\nIt has two lines, and word{i % 7}." for i in range(n)]
    (root / "a.txt").write_text("\n\n".join(docs[: n // 2]) + "\n")
    with open(root / "b.jsonl", "w") as f:
        for d in docs[n // 2 :]:
            f.write(json.dumps({"text": d}) + "\n")
        f.write("\n")  # blank lines are ignored
    return docs


def _read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]  # copy: the mmap closes with ds


def test_prepare_writes_train_val(tmp_path):
    docs = _make_inputs(tmp_path / "in")
    train, val = prepare_data([tmp_path / "in"], "toy", tmp_path / "out", val_fraction=0.1)
    assert train == str(tmp_path / "out" / "toy") and val == str(tmp_path / "out" / "toy-val")
    for p in (train, val):
        for ext in (".bin", ".idx", ".meta.json"):
            assert (tmp_path / "out" / (p.rsplit("/", 1)[1] + ext)).is_file()
    tok = load_tokenizer("bundled")
    meta = json.loads((tmp_path / "out" / "toy.meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert meta["num_docs"] == 36 and meta["val_num_docs"] == 4
    assert meta["dtype"] == "uint16"
    tr, va = _read_docs(train), _read_docs(val)
    assert len(tr) == 36 and len(va) == 4
    assert sum(len(d) for d in tr) == meta["num_tokens"]
    assert all(d.dtype == np.uint16 and d[-1] == tok.eod and tok.eod not in d[:-1] for d in tr)
    decoded = [tok.decode(d[:-1].tolist()) for d in tr + va]
    assert sorted(decoded) == sorted(docs)  # document-level split, nothing lost or cut
    # input order kept inside a split
    assert [docs.index(d) for d in decoded[:36]] == sorted(docs.index(d) for d in decoded[:36])
    assert check_prefix(train, tok)["documents"] == 36


def test_prepare_deterministic_and_seeded(tmp_path):
    _make_inputs(tmp_path / "in")
    a = prepare_data([tmp_path / "in"], "x", tmp_path / "o1", val_fraction=0.2, seed=1)
    b = prepare_data([tmp_path / "in"], "x", tmp_path / "o2", val_fraction=0.2, seed=1)
    c = prepare_data([tmp_path / "in"], "x", tmp_path / "o3", val_fraction=0.2, seed=2)
    rd = lambda p: open(p + ".bin", "rb").read()  # noqa: E731
    assert rd(a[1]) == rd(b[1]) and rd(a[0]) == rd(b[0])
    assert rd(a[1]) != rd(c[1])


def test_prepare_no_val(tmp_path):
    _make_inputs(tmp_path / "in")
    train, val = prepare_data([tmp_path / "in"], "x", tmp_path / "o", val_fraction=0.0)
    assert val is None and not (tmp_path / "o" / "x-val.bin").exists()
    assert read_index_header(train + ".idx")["documents"] == 40


def test_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_data([tmp_path / "missing.txt"], "x", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        prepare_data([tmp_path / "empty"], "x", tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        prepare_data([tmp_path / "bad.jsonl"], "x", tmp_path / "o")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="domain"):
        prepare_data([tmp_path / "a.txt"], "../evil", tmp_path / "o")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data([tmp_path / "a.txt"], "x", tmp_path / "o", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prepare_data(
            [tmp_path / "a.txt"], "x", tmp_path / "o", tokenizer_spec=tmp_path / "nope.json"
        )


def test_cli_mains(tmp_path, capsys):
    _make_inputs(tmp_path / "in")
    tok_path = tmp_path / "tok.json"
    assert train_tokenizer_main(["--input", str(tmp_path / "in"), "--out", str(tok_path),
                                 "--vocab-size", "400"]) == 0  # fmt: skip
    assert tok_path.is_file()
    rc = main(["--input", str(tmp_path / "in" / "a.txt"), "--input", str(tmp_path / "in" / "b.jsonl"),
               "--domain", "toy", "--out", str(tmp_path / "out"), "--tokenizer", str(tok_path),
               "--val-fraction", "0.25"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "toy-val" in out and "30 docs" in out
    meta = json.loads((tmp_path / "out" / "toy.meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == load_tokenizer(tok_path).fingerprint
    rc = main(["--input", str(tmp_path / "nothing"), "--domain", "d", "--out", str(tmp_path)])
    assert rc == 2 and "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])


def test_index_bytes_match_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from sigma_moe.data.prepare import _write_indexed

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 8000, size=n).astype(np.uint16) for n in (5, 1, 300, 7)]
    _write_indexed(tmp_path / "ours", docs, np.uint16)
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in docs:
        b.add_document(torch.tensor(d.astype(np.int64)), [len(d)])
    b.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
