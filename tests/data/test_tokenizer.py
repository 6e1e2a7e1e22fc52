import json

import pytest

from sigma_moe.data.tokenizer import (
    BUNDLED_TOKENIZER_PATH,
    EOD_TOKEN,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "def f(x):\n    return {'a': [x ** 2, None]}  # comment\n\n\tpass\n",
    "Problem: Solve for x: 3x - 7 = 11.\nAnswer: x = 6",
    "héllo wörld — “quotes” ™ 🙂 日本語 \x00\x7f",
    "https://www.example.com/a?utm_source=abc123&sid=ff00",
    "",
    "   leading and trailing spaces   ",
]


def test_bundled_roundtrip():
    tok = load_tokenizer("bundled")
    assert tok.vocab_size == 8192
    assert tok.eod == tok.token_to_id(EOD_TOKEN) == 0
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    # compresses English reasonably
    assert len(tok.encode(SAMPLES[0])) <= 15


def test_identity_fields():
    tok = load_tokenizer("bundled")
    tok2 = load_tokenizer(str(BUNDLED_TOKENIZER_PATH))
    assert tok.fingerprint == tok2.fingerprint and len(tok.fingerprint) == 64
    json.dumps(tok.unique_identifiers)
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint
    assert tok.path == str(BUNDLED_TOKENIZER_PATH)
    assert load_tokenizer(tok) is tok


def test_fingerprint_ignores_formatting(tmp_path):
    raw = json.loads(BUNDLED_TOKENIZER_PATH.read_text())
    p = tmp_path / "pretty.json"
    p.write_text(json.dumps(raw, indent=4))
    assert Tokenizer(p).fingerprint == load_tokenizer("bundled").fingerprint


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_train_tokenizer_deterministic(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nthe quick brown fox\n\n" * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jumps over the lazy dog"}) + "\n")
    t1 = train_tokenizer([tmp_path], 300, tmp_path / "t1.json")
    t2 = train_tokenizer([tmp_path / "a.txt", tmp_path / "b.jsonl"], 300, tmp_path / "t2.json")
    assert t1.fingerprint == t2.fingerprint
    assert t1.vocab_size <= 300 and t1.eod == 0
    assert t1.decode(t1.encode("the lazy fox")) == "the lazy fox"
    assert t1.fingerprint != load_tokenizer("bundled").fingerprint
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t3.json")


@pytest.mark.slow
def test_committed_tokenizer_is_reproducible(tmp_path):
    from sigma_moe.data.tokenizer import train_bundled_tokenizer

    tok = train_bundled_tokenizer(tmp_path / "tokenizer.json")
    assert tok.fingerprint == load_tokenizer("bundled").fingerprint


def test_tokenizer_fingerprint_helper(tmp_path):
    from sigma_moe.data.tokenizer import tokenizer_fingerprint

    fp = load_tokenizer("bundled").fingerprint
    assert tokenizer_fingerprint(BUNDLED_TOKENIZER_PATH) == fp
    assert tokenizer_fingerprint(BUNDLED_TOKENIZER_PATH.parent) == fp
    assert tokenizer_fingerprint(BUNDLED_TOKENIZER_PATH.read_text()) == fp
    with pytest.raises(FileNotFoundError, match="nope"):
        tokenizer_fingerprint(tmp_path / "nope")
