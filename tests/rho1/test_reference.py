import json

import pytest
import torch
import torch.nn.functional as F
from _rho1_helpers import make_hf_reference, make_ours_reference

from sigma_moe.config import RunConfig
from sigma_moe.data.tokenizer import BUNDLED_TOKENIZER_PATH, load_tokenizer
from sigma_moe.rho1.reference import (
    load_reference,
    reference_dtype,
    reference_fingerprint,
    score_batch,
)


def _batch(vocab, B=2, S=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, S + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return ids[:, :-1], labels


def test_hf_reference_scores(hf_reference):
    ref = load_reference(hf_reference, "bundled")
    assert ref.kind == "transformers" and ref.fingerprint.startswith("transformers:")
    tok = load_tokenizer("bundled")
    ids, labels = _batch(tok.vocab_size)
    ce = score_batch(ref, ids, labels)
    assert ce.dtype == torch.float32 and ce.shape == ids.shape
    assert (ce[0, :3] == 0).all() and (ce[1] > 0).all()
    logits = ref.model(input_ids=ids).logits
    want = F.cross_entropy(logits[1].float(), labels[1], reduction="none")
    assert torch.allclose(ce[1], want, atol=1e-5)
    assert not any(p.requires_grad for p in ref.model.parameters())
    # same folder → same fingerprint (reloaded)
    assert load_reference(hf_reference).fingerprint == ref.fingerprint


def test_ours_reference_scores(ours_reference):
    ref = load_reference(ours_reference, "bundled")
    assert ref.kind == "sigma-moe"
    tok = load_tokenizer("bundled")
    ids, labels = _batch(tok.vocab_size)
    ce = score_batch(ref, ids, labels)
    assert ce.shape == ids.shape and (ce[0, :3] == 0).all() and torch.isfinite(ce).all()
    ce2 = score_batch(ref.model, ids, labels)
    assert torch.equal(ce, ce2)


def test_hf_tokenizer_mismatch(tmp_path):
    raw = json.loads(BUNDLED_TOKENIZER_PATH.read_text())
    vocab = raw["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    other = tmp_path / "other-tokenizer.json"
    other.write_text(json.dumps(raw))
    folder = make_hf_reference(tmp_path / "m", tokenizer_json=other)
    with pytest.raises(ValueError, match="fingerprint") as ei:
        load_reference(folder, "bundled")
    msg = str(ei.value)
    assert str(folder) in msg and load_tokenizer("bundled").fingerprint in msg


def test_hf_no_tokenizer_vocab_mismatch(tmp_path):
    folder = make_hf_reference(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab size 1000") as ei:
        load_reference(folder, "bundled")
    assert str(folder) in str(ei.value)


def test_ours_tokenizer_mismatch(tmp_path):
    ck = make_ours_reference(tmp_path / "run", tokenizer_fingerprint="deadbeef")
    with pytest.raises(ValueError, match="deadbeef"):
        load_reference(ck, "bundled")


def test_missing_reference(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_reference(tmp_path / "empty")


@pytest.mark.parametrize("which", ["ours", "hf"])
def test_bf16_reference(which, ours_reference, hf_reference):
    """rho1.reference_dtype=bf16: weights in bf16, losses returned in fp32 within bf16's error
    of the fp32 forward, and a fingerprint of its own (a store scored in fp32 is not reused)."""
    path = ours_reference if which == "ours" else hf_reference
    ref32 = load_reference(path, "bundled")
    ref16 = load_reference(path, "bundled", dtype="bf16")
    assert {p.dtype for p in ref16.model.parameters()} == {torch.bfloat16}
    assert ref16.fingerprint == f"{ref32.fingerprint}:bf16"
    assert reference_fingerprint(path, "bf16") == ref16.fingerprint
    assert reference_fingerprint(path) == ref32.fingerprint
    ids, labels = _batch(load_tokenizer("bundled").vocab_size)
    ce32, ce16 = score_batch(ref32, ids, labels), score_batch(ref16, ids, labels)
    assert ce16.dtype == torch.float32 and (ce16[0, :3] == 0).all()
    diff = (ce16 - ce32).abs()
    print(f"{which}: |bf16 - fp32| mean {diff.mean():.2e}, max {diff.max():.2e}")
    assert 0 < diff.max() < 0.05 * ce32.abs().max()  # bf16 differs, by bf16's rounding only


def test_bad_reference_dtype(ours_reference):
    with pytest.raises(ValueError, match=r"rho1.reference_dtype .*'fp16'"):
        load_reference(ours_reference, "bundled", dtype="fp16")


@pytest.mark.parametrize(
    "setting, precision, want",
    [
        ("auto", "fp32", "fp32"),
        ("auto", "bf16", "bf16"),
        ("fp32", "bf16", "fp32"),
        ("bf16", "fp32", "bf16"),
    ],
)
def test_reference_dtype_auto_follows_train_precision(setting, precision, want):
    cfg = RunConfig()
    cfg.rho1.reference_dtype, cfg.train.precision = setting, precision
    assert reference_dtype(cfg) == want
