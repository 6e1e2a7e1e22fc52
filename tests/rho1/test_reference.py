import json

import pytest
import torch
import torch.nn.functional as F
from _rho1_helpers import make_hf_reference, make_ours_reference

from sigma_moe.data.tokenizer import BUNDLED_TOKENIZER_PATH, load_tokenizer
from sigma_moe.rho1.reference import load_reference, score_batch


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
