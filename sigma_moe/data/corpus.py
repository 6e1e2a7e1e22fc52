"""The bundled multi-domain corpus: real text shipped with the package plus seeded generators.

Domains (names fixed; ``clean`` marks the domains a Rho-1 reference model trains on):

- ``prose`` (clean): the King James Bible (every other chapter, one per document) and the Jargon File 4.4.7
  (one entry or chapter per document), from ``bundled/kjv.jsonl.xz`` and
  ``bundled/jargon.jsonl.xz``.
- ``code`` (clean): a fixed snapshot of 42 CPython 3.11 standard-library modules
  (``bundled/pystdlib.jsonl.xz``), cut at top-level statements into documents of ~4 KB.
- ``math`` (clean): template arithmetic / algebra word problems with worked answers (seeded).
- ``webnoise`` (noise): real prose sentences interleaved with web boilerplate: hex hashes,
  UUIDs, timestamps, tracking URLs, cookie banners, navigation menus (seeded).

Everything is deterministic: the same ``seed`` gives byte-identical text on every machine
(only ``random.Random`` with an explicit seed is used, no hash-order dependence).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

DOMAINS: tuple[str, ...] = ("prose", "code", "math", "webnoise")
CLEAN_DOMAINS: frozenset[str] = frozenset({"prose", "code", "math"})
CORPUS_VERSION = 1  # bump on any change of the generated text: it names the cache folder
DEFAULT_SEED = 1234

NUM_MATH_DOCS = 2000
NUM_WEBNOISE_DOCS = 1200
CODE_CHUNK_CHARS = 4000


def read_bundled_source(name: str) -> list[dict]:
    """Records (``{"source", "text"}``) of one bundled snapshot: ``kjv``, ``jargon``, ``pystdlib``."""
    path = BUNDLED_DIR / f"{name}.jsonl.xz"
    if not path.is_file():
        raise FileNotFoundError(f"bundled source {path} is missing (broken installation?)")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- prose / code


KJV_CHAPTER_STRIDE = 2  # every other chapter keeps the corpus (and its build time) small


def prose_docs() -> list[str]:
    kjv = read_bundled_source("kjv")[::KJV_CHAPTER_STRIDE]
    return [r["text"] for r in kjv] + [r["text"] for r in read_bundled_source("jargon")]


_TOPLEVEL = re.compile(r"^(def |class |async def |@|if __name__)")


def code_docs(chunk_chars: int = CODE_CHUNK_CHARS) -> list[str]:
    """Modules cut at top-level ``def``/``class``/decorator lines into ~``chunk_chars`` docs."""
    docs: list[str] = []
    for rec in read_bundled_source("pystdlib"):
        header = f"# {rec['source']}\n"
        lines = rec["text"].splitlines(keepends=True)
        blocks: list[list[str]] = [[]]
        for i, line in enumerate(lines):
            prev_is_decorator = i > 0 and lines[i - 1].startswith("@")
            if _TOPLEVEL.match(line) and blocks[-1] and not prev_is_decorator:
                blocks.append([])
            blocks[-1].append(line)
        cur = ""
        for block in blocks:
            text = "".join(block)
            if cur and len(cur) + len(text) > chunk_chars:
                docs.append(header + cur.strip("\n") + "\n")
                cur = ""
            cur += text
        if cur.strip():
            docs.append(header + cur.strip("\n") + "\n")
    return docs


# --------------------------------------------------------------------------- math

_NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
]  # fmt: skip
_ITEMS = [
    "apples", "books", "marbles", "pencils", "stamps", "coins", "cards", "stickers",
    "oranges", "shells", "bricks", "cookies",
]  # fmt: skip
_UNITS_SPEED = [("km", "hour"), ("miles", "hour"), ("metres", "minute")]


def _p_add_sub(r: random.Random) -> str:
    n, it = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(5, 200), r.randint(2, 150)
    c = r.randint(1, a + b)
    other = r.choice([x for x in _NAMES if x != n])
    return (
        f"Problem: {n} has {a} {it}. {n} buys {b} more and then gives {c} to {other}. "
        f"How many {it} does {n} have now?\n"
        f"Solution: After buying, {n} has {a} + {b} = {a + b} {it}. "
        f"After giving {c} away, {n} has {a + b} - {c} = {a + b - c} {it}.\n"
        f"Answer: {a + b - c}"
    )


def _p_mul(r: random.Random) -> str:
    n, it = r.choice(_NAMES), r.choice(_ITEMS)
    boxes, per, price = r.randint(2, 40), r.randint(2, 60), r.randint(1, 9)
    total = boxes * per
    return (
        f"Problem: {n} buys {boxes} boxes with {per} {it} in each box. Each box costs ${price}. "
        f"How many {it} does {n} get, and how much does {n} pay?\n"
        f"Solution: The number of {it} is {boxes} * {per} = {total}. "
        f"The cost is {boxes} * ${price} = ${boxes * price}.\n"
        f"Answer: {total} {it}, ${boxes * price}"
    )


def _p_div(r: random.Random) -> str:
    n, it = r.choice(_NAMES), r.choice(_ITEMS)
    k, q, rem = r.randint(2, 12), r.randint(2, 50), 0
    rem = r.randint(0, k - 1)
    total = k * q + rem
    return (
        f"Problem: {n} shares {total} {it} equally among {k} friends. How many {it} does each "
        f"friend get, and how many are left over?\n"
        f"Solution: {total} / {k} = {q} remainder {rem}, because {k} * {q} = {k * q} and "
        f"{total} - {k * q} = {rem}.\n"
        f"Answer: {q} each, {rem} left over"
    )


def _p_speed(r: random.Random) -> str:
    n = r.choice(_NAMES)
    dist_u, time_u = r.choice(_UNITS_SPEED)
    v, t = r.randint(3, 90), r.randint(2, 12)
    return (
        f"Problem: {n} travels at {v} {dist_u} per {time_u} for {t} {time_u}s. "
        f"How far does {n} travel?\n"
        f"Solution: distance = speed * time = {v} * {t} = {v * t} {dist_u}.\n"
        f"Answer: {v * t} {dist_u}"
    )


def _p_percent(r: random.Random) -> str:
    price = r.randint(2, 80) * 5
    pct = r.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
    off = price * pct // 100
    whole = price * pct % 100 == 0
    off_s = f"{off}" if whole else f"{price * pct / 100:g}"
    final = f"{price - off}" if whole else f"{price - price * pct / 100:g}"
    return (
        f"Problem: A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price?\n"
        f"Solution: The discount is {pct}% of {price} = {price} * {pct} / 100 = {off_s}. "
        f"The sale price is {price} - {off_s} = {final}.\n"
        f"Answer: ${final}"
    )


def _p_rect(r: random.Random) -> str:
    w, h = r.randint(2, 60), r.randint(2, 60)
    return (
        f"Problem: A rectangle is {w} m wide and {h} m long. Find its area and its perimeter.\n"
        f"Solution: area = {w} * {h} = {w * h} square metres. "
        f"perimeter = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} metres.\n"
        f"Answer: area {w * h}, perimeter {2 * (w + h)}"
    )


def _p_linear(r: random.Random) -> str:
    a, x, b = r.randint(2, 15), r.randint(-20, 30), r.randint(-50, 50)
    c = a * x + b
    bs = f"+ {b}" if b >= 0 else f"- {-b}"
    step = f"{c} - {b}" if b >= 0 else f"{c} + {-b}"
    return (
        f"Problem: Solve for x: {a}x {bs} = {c}.\n"
        f"Solution: Subtract the constant: {a}x = {step} = {c - b}. "
        f"Divide by {a}: x = {c - b} / {a} = {x}.\n"
        f"Check: {a} * {x} {bs} = {a * x} {bs} = {c}.\n"
        f"Answer: x = {x}"
    )


def _p_age(r: random.Random) -> str:
    n1, n2 = r.sample(_NAMES, 2)
    y, d, k = r.randint(3, 40), r.randint(1, 30), r.randint(2, 15)
    return (
        f"Problem: {n1} is {y} years old. {n2} is {d} years older than {n1}. "
        f"How old will {n2} be in {k} years?\n"
        f"Solution: {n2} is now {y} + {d} = {y + d}. In {k} years {n2} will be "
        f"{y + d} + {k} = {y + d + k}.\n"
        f"Answer: {y + d + k}"
    )


def _p_sum_seq(r: random.Random) -> str:
    a, d, n = r.randint(1, 20), r.randint(1, 9), r.randint(3, 12)
    terms = [a + i * d for i in range(n)]
    last = terms[-1]
    s = n * (a + last) // 2
    return (
        f"Problem: Find the sum of the arithmetic sequence {', '.join(map(str, terms))}.\n"
        f"Solution: There are {n} terms, the first is {a} and the last is {last}. "
        f"sum = n * (first + last) / 2 = {n} * ({a} + {last}) / 2 = {n} * {a + last} / 2 = {s}.\n"
        f"Answer: {s}"
    )


def _p_avg(r: random.Random) -> str:
    n = r.choice(_NAMES)
    k = r.randint(3, 6)
    mean = r.randint(50, 95)
    scores = [mean + r.randint(-10, 10) for _ in range(k - 1)]
    scores.append(mean * k - sum(scores))
    return (
        f"Problem: {n}'s test scores are {', '.join(map(str, scores))}. What is the mean score?\n"
        f"Solution: The total is {' + '.join(map(str, scores))} = {sum(scores)}. "
        f"The mean is {sum(scores)} / {k} = {mean}.\n"
        f"Answer: {mean}"
    )


def _p_fraction(r: random.Random) -> str:
    from math import gcd

    b, d = r.randint(2, 12), r.randint(2, 12)
    a, c = r.randint(1, b - 1), r.randint(1, d - 1)
    num, den = a * d + c * b, b * d
    g = gcd(num, den)
    return (
        f"Problem: Compute {a}/{b} + {c}/{d}.\n"
        f"Solution: Use the common denominator {b} * {d} = {den}: "
        f"{a}/{b} + {c}/{d} = {a * d}/{den} + {c * b}/{den} = {num}/{den}"
        + (f" = {num // g}/{den // g} (divide by {g})" if g > 1 else "")
        + ".\n"
        f"Answer: {num // g}/{den // g}"
    )


_MATH_TEMPLATES = [
    _p_add_sub, _p_mul, _p_div, _p_speed, _p_percent, _p_rect, _p_linear, _p_age, _p_sum_seq,
    _p_avg, _p_fraction,
]  # fmt: skip


def math_docs(seed: int = DEFAULT_SEED, n: int = NUM_MATH_DOCS) -> list[str]:
    """``n`` documents of 1-4 worked problems each, seeded."""
    r = random.Random(f"math-{seed}")
    docs = []
    for _ in range(n):
        k = r.randint(1, 4)
        docs.append("\n\n".join(r.choice(_MATH_TEMPLATES)(r) for _ in range(k)))
    return docs


# --------------------------------------------------------------------------- webnoise

_WORDS = [
    "home", "news", "sports", "login", "signup", "account", "shop", "cart", "deals", "blog",
    "help", "faq", "about", "contact", "careers", "press", "privacy", "terms", "sitemap",
    "search", "feed", "share", "subscribe", "download", "more",
]  # fmt: skip
_TLDS = ["com", "net", "org", "io", "info", "biz", "co.uk", "de"]
_COOKIE = [
    "We use cookies to improve your experience. By continuing to browse you accept our use of "
    "cookies. [Accept all] [Reject] [Settings]",
    "This site uses cookies and similar technologies for analytics and advertising. "
    "Manage preferences | Accept",
    "COOKIE NOTICE: we and our {n} partners store and access information on your device.",
    "Your privacy matters to us. Click 'Accept' to consent to cookies. ID: {hex}",
]
_BOILER = [
    "Share on Facebook | Tweet | Pin it | Email",
    "Advertisement",
    "Click here to subscribe to our newsletter!!!",
    "(c) {year} {site} All rights reserved.",
    "Posted by user{num} on {ts} | {num2} comments",
    "Loading...",
    "Page {num} of {num2} << prev | next >>",
    "You may also like: {w1} {w2} {w3}",
    "Sponsored content: {w1}-{w2}.{tld}/?ref={hex}",
    "ERROR 404: resource {hex} not found",
    "session={hex}; csrf_token={hex2}; expires={ts}",
]


def _rand_hex(r: random.Random, n: int) -> str:
    return "".join(r.choice("0123456789abcdef") for _ in range(n))


def _rand_ts(r: random.Random) -> str:
    return (
        f"{r.randint(2001, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T"
        f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"
    )


def _rand_uuid(r: random.Random) -> str:
    h = _rand_hex(r, 32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _rand_url(r: random.Random) -> str:
    site = f"www.{r.choice(_WORDS)}{r.randint(1, 999)}.{r.choice(_TLDS)}"
    path = "/".join(r.choice(_WORDS) for _ in range(r.randint(1, 3)))
    q = "&".join(
        f"{r.choice(['utm_source', 'utm_campaign', 'sid', 'ref', 'fbclid', 'gclid'])}="
        f"{_rand_hex(r, r.randint(6, 20))}"
        for _ in range(r.randint(1, 3))
    )
    return f"https://{site}/{path}?{q}"


def _noise_line(r: random.Random) -> str:
    kind = r.randint(0, 7)
    if kind == 0:
        return " | ".join(w.capitalize() for w in r.sample(_WORDS, r.randint(4, 8)))
    if kind == 1:
        return r.choice(_COOKIE).format(n=r.randint(100, 900), hex=_rand_hex(r, 16))
    if kind == 2:
        return _rand_url(r)
    if kind == 3:
        return f"id={_rand_uuid(r)} ts={_rand_ts(r)} sha1={_rand_hex(r, 40)}"
    if kind == 4:
        return f"[{_rand_ts(r)}] GET {_rand_url(r)} {r.choice([200, 301, 404, 500])}"
    return r.choice(_BOILER).format(
        year=r.randint(1998, 2024),
        site=f"{r.choice(_WORDS)}.{r.choice(_TLDS)}",
        num=r.randint(1, 9999),
        num2=r.randint(1, 999),
        ts=_rand_ts(r),
        w1=r.choice(_WORDS),
        w2=r.choice(_WORDS),
        w3=r.choice(_WORDS),
        tld=r.choice(_TLDS),
        hex=_rand_hex(r, 24),
        hex2=_rand_hex(r, 32),
    )


def _prose_sentences(prose: Iterable[str]) -> list[str]:
    out = []
    for doc in prose:
        for line in doc.splitlines():
            line = re.sub(r"^\d+ ", "", line.strip())  # drop KJV verse numbers
            if 30 <= len(line) <= 300 and not line.startswith((":", "Chapter")):
                out.append(line)
    return out


def webnoise_docs(
    seed: int = DEFAULT_SEED, n: int = NUM_WEBNOISE_DOCS, prose: list[str] | None = None
) -> list[str]:
    """Pages of real prose lines (about 40%) interleaved with boilerplate (about 60%)."""
    r = random.Random(f"webnoise-{seed}")
    sentences = _prose_sentences(prose if prose is not None else prose_docs())
    docs = []
    for _ in range(n):
        lines = [" | ".join(w.capitalize() for w in r.sample(_WORDS, 5))]
        start = r.randrange(len(sentences))
        j = 0
        for _ in range(r.randint(6, 16)):
            if r.random() < 0.4:
                lines.append(sentences[(start + j) % len(sentences)])
                j += 1
            else:
                lines.append(_noise_line(r))
        docs.append("\n".join(lines))
    return docs


# --------------------------------------------------------------------------- corpus


def corpus_docs(seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """All four domains' documents, in a fixed order."""
    prose = prose_docs()
    return {
        "prose": prose,
        "code": code_docs(),
        "math": math_docs(seed),
        "webnoise": webnoise_docs(seed, prose=prose),
    }


def corpus_hash(docs: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(docs):
        h.update(name.encode())
        for d in docs[name]:
            h.update(b"\x00")
            h.update(d.encode("utf-8"))
    return h.hexdigest()


def write_corpus(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write ``<out_dir>/<domain>.jsonl`` (one ``{"text": ...}`` per document) for each domain."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in corpus_docs(seed).items():
        p = out / f"{name}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        paths[name] = p
    return paths
