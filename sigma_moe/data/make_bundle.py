"""Maintainer tool: (re)create the raw source snapshots under ``sigma_moe/data/bundled/``.

Not used at run time. It was run once on a Debian machine with the packages ``bible-kjv-text``
and ``jargon-text`` installed (``apt-get install bible-kjv-text jargon-text``) and CPython 3.11's
standard library at ``/usr/lib/python3.11``; its outputs are committed so the corpus never depends
on the machine or the interpreter version. Afterwards it retrains the bundled tokenizer.

    python -m sigma_moe.data.make_bundle [--stdlib /usr/lib/python3.11] [--no-tokenizer]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import re
import subprocess
import textwrap
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled"

KJV_BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers",
    "Deu": "Deuteronomy", "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth",
    "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra", "Neh": "Nehemiah",
    "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs",
    "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
    "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel",
    "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum",
    "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah",
    "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John",
    "Acts": "Acts", "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians",
    "Gal": "Galatians", "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians",
    "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy",
    "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews",
    "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John",
    "3Jn": "3 John", "Jude": "Jude", "Rev": "Revelation",
}  # fmt: skip

STDLIB_MODULES = [
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "colorsys.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "datetime.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py",
    "gettext.py", "glob.py", "graphlib.py", "heapq.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "json/scanner.py", "logging/__init__.py",
    "pathlib.py", "pprint.py", "queue.py", "random.py", "sched.py", "shlex.py", "shutil.py",
    "statistics.py", "string.py", "textwrap.py", "tokenize.py", "uuid.py", "weakref.py",
    "zipfile.py",
]  # fmt: skip


def _write_jsonl_xz(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{path.name}: {len(records)} docs, {len(data)} B raw, {path.stat().st_size} B xz")


def kjv_docs() -> list[dict]:
    out = subprocess.run(
        ["bible", "-f", "-m", "8", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^([0-9]?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        book, chap, verse, text = m.group(1), int(m.group(2)), m.group(3), m.group(4).strip()
        chapters.setdefault((KJV_BOOKS[book], chap), []).append(f"{verse} {text}")
    return [
        {"source": "kjv", "text": f"{book} {chap}\n" + "\n".join(verses)}
        for (book, chap), verses in chapters.items()
    ]


def jargon_docs() -> list[dict]:
    raw = gzip.open("/usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8").read()
    raw = raw.replace("\xa0", " ")
    lines = raw.splitlines()
    docs: list[list[str]] = []
    cur: list[str] = []
    for line in lines:
        # Glossary entries start with "   :term:"; chapters with "Chapter N." / "Appendix X."
        if re.match(r"^   :[^ ].*:", line) or re.match(
            r"^(Chapter\s\d+|Appendix\s[A-Z])\.\s", line
        ):
            if cur:
                docs.append(cur)
            cur = []
        cur.append(line)
    if cur:
        docs.append(cur)
    records = []
    for d in docs:
        text = textwrap.dedent("\n".join(d)).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)
        if len(text) < 40:
            continue
        records.append({"source": "jargon", "text": text})
    # drop the front matter and the table of contents before Chapter 1
    first = next(i for i, r in enumerate(records) if r["text"].startswith("Chapter 1."))
    return records[first:]


def stdlib_docs(root: Path) -> list[dict]:
    records = []
    for rel in STDLIB_MODULES:
        src = (root / rel).read_text(encoding="utf-8")
        records.append({"source": f"cpython-3.11/Lib/{rel}", "text": src})
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stdlib", default="/usr/lib/python3.11")
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args(argv)
    BUNDLED.mkdir(parents=True, exist_ok=True)
    _write_jsonl_xz(BUNDLED / "kjv.jsonl.xz", kjv_docs())
    _write_jsonl_xz(BUNDLED / "jargon.jsonl.xz", jargon_docs())
    _write_jsonl_xz(BUNDLED / "pystdlib.jsonl.xz", stdlib_docs(Path(args.stdlib)))
    if not args.no_tokenizer:
        from sigma_moe.data.tokenizer import train_bundled_tokenizer

        train_bundled_tokenizer()


if __name__ == "__main__":
    main()
