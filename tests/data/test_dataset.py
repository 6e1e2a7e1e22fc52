import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sigma_moe.data.dataset import (
    DomainSpec,
    build_train_dataset,
    build_val_datasets,
    collate,
    get_batch,
)
from sigma_moe.data.prepare import prepare_data
from sigma_moe.data.tokenizer import load_tokenizer, train_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def train_ds(bundled_domains):
    return build_train_dataset(bundled_domains, SEQ, 4000, seed=1234, tokenizer="bundled")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bundled_dir_layout(bundled_data_dir):
    marker = json.loads((bundled_data_dir / "COMPLETE.json").read_text())
    assert set(marker["domains"]) == {"prose", "code", "math", "webnoise"}
    for name in marker["domains"]:
        for p in (name, f"{name}-val"):
            assert (bundled_data_dir / f"{p}.bin").is_file()
            assert (bundled_data_dir / f"{p}.idx").is_file()
    from sigma_moe.data.bundled import ensure_bundled_data

    assert ensure_bundled_data() == bundled_data_dir  # idempotent, fast path


def test_sample_format(train_ds):
    s = train_ds[0]
    assert s["input_ids"].shape == (SEQ,) and s["input_ids"].dtype == torch.int64
    assert s["labels"].shape == (SEQ,) and s["labels"].dtype == torch.int64
    assert s["loss_mask"].dtype == torch.float32
    assert s["position_ids"].dtype == torch.int64
    assert s["domain"].shape == () and s["sample_index"].shape == ()
    assert "doc_ids" not in s
    assert torch.equal(s["position_ids"], torch.arange(SEQ))
    b = get_batch(train_ds, 10, 4)
    assert b["input_ids"].shape == (4, SEQ) and b["domain"].shape == (4,)
    assert _same(b, collate([train_ds[10 + i] for i in range(4)]))
    assert len(train_ds) >= 4000
    with pytest.raises(IndexError):
        train_ds[len(train_ds)]


def test_labels_shift_and_eod_loss_mask(train_ds):
    eod = train_ds.tokenizer.eod
    seen_eod = 0
    for i in range(0, 400, 3):
        s = train_ds[i]
        x, y, m = s["input_ids"], s["labels"], s["loss_mask"]
        assert torch.equal(x[1:], y[:-1])  # labels are inputs shifted by one
        # the position whose input is EOD would predict the next document's first token
        assert torch.equal(m, (x != eod).float())
        seen_eod += int((x == eod).sum())
        # predicting EOD itself (end of document) is trained
        assert (m[y == eod] == 1).all()
    assert seen_eod > 10


def test_reset_at_eod(bundled_domains):
    ds = build_train_dataset(bundled_domains, SEQ, 500, seed=1234, reset_at_eod=True)
    plain = build_train_dataset(bundled_domains, SEQ, 500, seed=1234)
    eod = ds.tokenizer.eod
    checked = 0
    for i in range(100):
        s = ds[i]
        assert torch.equal(s["input_ids"], plain[i]["input_ids"])
        x, pos, doc = s["input_ids"], s["position_ids"], s["doc_ids"]
        assert doc.dtype == torch.int32 and doc[0] == 0
        for j in (x == eod).nonzero().flatten().tolist():
            if j + 1 < SEQ:
                assert pos[j + 1] == 0 and doc[j + 1] == doc[j] + 1
                checked += 1
            assert j == 0 or doc[j] == doc[j - 1]  # EOD belongs to the doc it ends
        assert torch.equal(doc, torch.cumsum((x == eod).int(), 0).int() - (x == eod).int())
    assert checked > 5


def test_deterministic_and_seeded(bundled_domains, train_ds):
    again = build_train_dataset(bundled_domains, SEQ, 4000, seed=1234, tokenizer="bundled")
    for i in (0, 1, 17, 999, 3999):
        assert _same(train_ds[i], again[i])
    other = build_train_dataset(bundled_domains, SEQ, 4000, seed=99)
    diff = sum(not torch.equal(train_ds[i]["input_ids"], other[i]["input_ids"]) for i in range(20))
    assert diff >= 15
    assert train_ds.identity == again.identity != other.identity


def test_domain_and_index_consistent(train_ds):
    for i in (0, 5, 123, 2048, len(train_ds) - 1):
        d, k = train_ds.domain_and_index(i)
        s = train_ds[i]
        assert int(s["domain"]) == d and int(s["sample_index"]) == k
        assert 0 <= k < train_ds.domain_sizes[d]
        assert _same(s, train_ds.get_domain_sample(d, k))
    # every (domain, index) pair appears once: a sample's identity is unique
    pairs = {train_ds.domain_and_index(i) for i in range(len(train_ds))}
    assert len(pairs) == len(train_ds)


def test_blend_proportions(train_ds, bundled_domains):
    w = np.array([d.weight for d in bundled_domains])
    for start, stop in ((0, 100), (0, len(train_ds)), (1000, 1800)):
        frac = train_ds.domain_counts(start, stop) / (stop - start)
        assert np.abs(frac - w / w.sum()).max() < 0.02, (start, stop, frac)
    assert train_ds.domain_names == ["prose", "code", "math", "webnoise"]
    assert train_ds.clean == [True, True, True, False]


def test_decoded_text_is_domain_text(train_ds):
    tok = train_ds.tokenizer
    for i in range(40):
        s = train_ds[i]
        text = tok.decode(s["input_ids"].tolist())
        name = train_ds.domain_names[int(s["domain"])]
        if name == "math":
            assert "Answer" in text or "Solution" in text or "Problem" in text or len(text) < 300


def test_val_datasets(bundled_domains):
    v1 = build_val_datasets(bundled_domains, SEQ, "bundled", max_samples_per_domain=16)
    v2 = build_val_datasets(bundled_domains, SEQ, "bundled", max_samples_per_domain=16)
    assert list(v1) == ["prose", "code", "math", "webnoise"]
    for i, (name, ds) in enumerate(v1.items()):
        assert len(ds) == 16 and ds.domain_id == i
        assert ds.clean == (name != "webnoise")
        for j in (0, 15):
            assert _same(ds[j], v2[name][j])
            assert int(ds[j]["domain"]) == i
    full = build_val_datasets(bundled_domains[:1], SEQ, max_samples_per_domain=None)["prose"]
    assert len(full) > 16


def test_single_domain_and_user_data(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(f"user document {i} " + "text " * (i % 13) for i in range(300)))
    train, val = prepare_data([src], "mine", tmp_path / "data", val_fraction=0.1)
    dom = [DomainSpec("mine", str(tmp_path / "data" / "mine"), 1.0, True)]
    ds = build_train_dataset(dom, 16, 200, seed=3)
    assert len(ds) >= 200 and ds.domain_sizes == [len(ds)]
    assert ds.domain_and_index(7) == (0, 7) and int(ds[7]["sample_index"]) == 7
    assert "user document" in ds.tokenizer.decode(ds[0]["input_ids"].tolist() * 2)
    assert (tmp_path / "data" / "mine" / "cache").is_dir()  # megatron's index cache
    val_ds = build_val_datasets(dom, 16)
    assert len(val_ds["mine"]) > 0
    # ".bin" suffix tolerated
    ds2 = build_train_dataset([DomainSpec("mine", train + ".bin")], 16, 200, seed=3)
    assert _same(ds[5], ds2[5])


def test_reprepare_invalidates_index_cache(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(f"doc {i} " + "alpha " * 20 for i in range(50)))
    prepare_data([src], "d", tmp_path / "data", val_fraction=0.0)
    dom = [DomainSpec("d", str(tmp_path / "data" / "d"))]
    a = build_train_dataset(dom, 16, 50, seed=1)[3]["input_ids"]
    src.write_text("\n\n".join(f"item {i} " + "beta " * 3 for i in range(30)))
    prepare_data([src], "d", tmp_path / "data", val_fraction=0.0)
    b = build_train_dataset(dom, 16, 50, seed=1)[3]["input_ids"]
    assert not torch.equal(a, b)
    tok = load_tokenizer("bundled")
    assert "beta" in tok.decode(b.tolist()) or "item" in tok.decode(b.tolist())


def _copy_prefix(src_prefix: str, dst_dir: Path, name: str) -> str:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(src_prefix + ext, dst_dir / f"{name}{ext}")
    return str(dst_dir / name)


def test_missing_files(tmp_path, bundled_data_dir):
    dom = [DomainSpec("x", str(tmp_path / "nowhere" / "x"))]
    with pytest.raises(FileNotFoundError, match=r"nowhere/x.*prepare-data"):
        build_train_dataset(dom, SEQ, 10, seed=1)
    p = _copy_prefix(str(bundled_data_dir / "code"), tmp_path / "d", "code")
    Path(p + ".idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"code.idx"):
        build_train_dataset([DomainSpec("code", p)], SEQ, 10, seed=1)
    with pytest.raises(FileNotFoundError, match=r"-val"):
        build_val_datasets([DomainSpec("code", p)], SEQ)
    assert build_val_datasets([DomainSpec("code", p)], SEQ, missing="skip") == {}
    with pytest.raises(ValueError, match="unknown bundled domain"):
        build_train_dataset([DomainSpec("poetry", "bundled")], SEQ, 10, seed=1)


def test_truncated_or_corrupt_files(tmp_path, bundled_data_dir):
    p = _copy_prefix(str(bundled_data_dir / "code"), tmp_path / "t1", "code")
    data = Path(p + ".bin").read_bytes()
    Path(p + ".bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"code.bin is truncated"):
        build_train_dataset([DomainSpec("code", p)], SEQ, 10, seed=1)
    p = _copy_prefix(str(bundled_data_dir / "code"), tmp_path / "t2", "code")
    idx = Path(p + ".idx").read_bytes()
    Path(p + ".idx").write_bytes(idx[:-100])
    with pytest.raises(ValueError, match=r"code.idx is truncated"):
        build_train_dataset([DomainSpec("code", p)], SEQ, 10, seed=1)
    Path(p + ".idx").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"code.idx is not a megatron index"):
        build_train_dataset([DomainSpec("code", p)], SEQ, 10, seed=1)


def test_tokenizer_mismatch(tmp_path, bundled_data_dir):
    (tmp_path / "a.txt").write_text("some words here\n\nand more words there\n\n" * 20)
    other = train_tokenizer([tmp_path / "a.txt"], 300, tmp_path / "other.json")
    dom = [DomainSpec("code", "bundled")]
    with pytest.raises(ValueError, match=r"other.json.*fingerprint|fingerprint.*other.json"):
        build_train_dataset(dom, SEQ, 10, seed=1, tokenizer=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="tokenizer"):
        build_val_datasets(dom, SEQ, other)


def test_bad_domain_lists():
    with pytest.raises(ValueError, match="empty"):
        build_train_dataset([], SEQ, 10, seed=1)
    with pytest.raises(ValueError, match="duplicate"):
        build_train_dataset([DomainSpec("a", "bundled"), DomainSpec("a", "bundled")], SEQ, 10, 1)
    with pytest.raises(ValueError, match="every weight is 0"):
        build_train_dataset([DomainSpec("prose", "bundled", 0.0)], SEQ, 10, seed=1)
    with pytest.raises(ValueError, match=r"\[prose\]\.weight"):
        build_train_dataset([DomainSpec("prose", "bundled", -1.0)], SEQ, 10, seed=1)


def test_zero_weight_domain_keeps_its_id(bundled_domains, train_ds):
    doms = [DomainSpec(d.name, d.path, d.weight, d.clean) for d in bundled_domains]
    doms[1].weight = 0.0  # code: eval only
    ds = build_train_dataset(doms, SEQ, 1000, seed=1234)
    assert ds.domain_sizes[1] == 0 and all(n > 0 for i, n in enumerate(ds.domain_sizes) if i != 1)
    counts = ds.domain_counts()
    assert counts[1] == 0 and len(counts) == 4
    for i in range(0, 1000, 50):
        d, k = ds.domain_and_index(i)
        assert d != 1 and int(ds[i]["domain"]) == d
    with pytest.raises(IndexError, match="weight 0"):
        ds.get_domain_sample(1, 0)
    assert ds.prefixes[1].endswith("code")


def test_token_ids_out_of_vocab(tmp_path):
    from sigma_moe.data.prepare import _write_indexed

    docs = [np.arange(i * 100, i * 100 + 300, dtype=np.uint16) for i in range(100)]  # up to 10199
    _write_indexed(tmp_path / "big", docs, np.uint16)
    with pytest.raises(ValueError, match=r"big.bin holds token ids.*8192"):
        build_train_dataset([DomainSpec("big", str(tmp_path / "big"))], SEQ, 10, seed=1)
