from sigma_moe.data import corpus


def test_generators_deterministic_per_seed():
    a = corpus.math_docs(seed=7, n=200)
    assert a == corpus.math_docs(seed=7, n=200)
    assert a != corpus.math_docs(seed=8, n=200)
    prose = corpus.prose_docs()[:300]
    w = corpus.webnoise_docs(seed=7, n=100, prose=prose)
    assert w == corpus.webnoise_docs(seed=7, n=100, prose=prose)
    assert w != corpus.webnoise_docs(seed=8, n=100, prose=prose)


def test_corpus_hash_stable_and_domains():
    docs = corpus.corpus_docs(seed=1234)
    assert tuple(docs) == corpus.DOMAINS == ("prose", "code", "math", "webnoise")
    assert corpus.corpus_hash(docs) == corpus.corpus_hash(corpus.corpus_docs(seed=1234))
    sizes = {k: sum(map(len, v)) for k, v in docs.items()}
    assert sizes["prose"] > 3_000_000 and sizes["code"] > 1_000_000
    assert all(s > 500_000 for s in sizes.values())
    assert all(d.strip() for v in docs.values() for d in v)
    assert corpus.CLEAN_DOMAINS == {"prose", "code", "math"}


def test_sources_look_right():
    kjv = corpus.read_bundled_source("kjv")
    assert kjv[0]["text"].startswith("Genesis 1\n1 In the beginning God created")
    assert len(kjv) == 1189
    jargon = corpus.read_bundled_source("jargon")
    assert any(r["text"].startswith(":hacker:") for r in jargon)
    code = corpus.code_docs()
    assert all(d.startswith("# cpython-3.11/Lib/") for d in code)
    compile(corpus.read_bundled_source("pystdlib")[0]["text"], "abc.py", "exec")


def test_math_answers_are_correct():
    import re

    for doc in corpus.math_docs(seed=3, n=300):
        for m in re.finditer(r"(?<![*+/-] )(?<![\d-])(-?\d+) \+ (-?\d+) = (-?\d+)", doc):
            a, b, c = map(int, m.groups())
            assert a + b == c, doc
        for m in re.finditer(r"(?<!\* )(?<![\d/])(\d+) \* (\d+) = (\d+)(?![\d/])", doc):
            a, b, c = map(int, m.groups())
            assert a * b == c, doc


def test_write_corpus(tmp_path):
    import json

    paths = corpus.write_corpus(tmp_path, seed=5)
    assert set(paths) == set(corpus.DOMAINS)
    first = json.loads(paths["math"].open().readline())
    assert first["text"].startswith("Problem:")
