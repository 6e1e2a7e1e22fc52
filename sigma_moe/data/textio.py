"""Reading documents from user files: blank-line separated ``.txt`` or ``.jsonl`` with ``text``.

``.gz`` / ``.xz`` compressed variants of both are read transparently. A directory means every
such file below it, in sorted order.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _base_suffix(p: Path) -> str:
    name = p.name.lower()
    for comp in (".gz", ".xz"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return os.path.splitext(name)[1]


def _open_text(p: Path):
    name = p.name.lower()
    if name.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def resolve_inputs(inputs: list[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Expand files and directories into the sorted list of document files.

    Raises FileNotFoundError naming a missing input, ValueError for a directory without any
    ``.txt``/``.jsonl`` file or a file of another type.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given: pass at least one --input FILE_OR_DIR")
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and _base_suffix(q) in TEXT_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"input directory {str(p)!r} holds no .txt or .jsonl files (optionally .gz/.xz)"
                )
            files.extend(found)
        else:
            if _base_suffix(p) not in TEXT_SUFFIXES:
                raise ValueError(
                    f"input {str(p)!r}: unsupported file type; expected .txt (documents separated "
                    f"by blank lines) or .jsonl (one JSON object with a 'text' field per line)"
                )
            files.append(p)
    return files


def iter_file_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of one file; empty documents are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input {str(p)!r} does not exist")
    try:
        yield from _file_documents(p)
    except UnicodeDecodeError as e:  # the codec's message does not say which file
        raise ValueError(
            f"input {str(p)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start} of a decoded block): convert it to UTF-8 or leave it out"
        ) from None
    except (EOFError, OSError, lzma.LZMAError) as e:  # a truncated or fake .gz / .xz
        raise ValueError(f"input {str(p)!r} cannot be read: {e}") from None


def _file_documents(p: Path) -> Iterator[str]:
    suffix = _base_suffix(p)
    with _open_text(p) as f:
        if suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{p}:{lineno}: expected an object with a string 'text' field")
                if obj["text"].strip():
                    yield obj["text"]
        else:
            text = f.read().replace("\r\n", "\n")
            for doc in _BLANK_LINE.split(text):
                doc = doc.strip("\n")
                if doc.strip():
                    yield doc


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` must be a folder or not exist yet, under no file: a clear error naming `what`
    (`--out`) instead of a FileExistsError / NotADirectoryError traceback from mkdir."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(
                    f"{what} {str(out)!r}: {str(p)!r} is an existing file, not a folder; "
                    f"choose another {what}"
                )
            break
    return out


def iter_documents(inputs) -> Iterator[str]:
    for p in resolve_inputs(inputs):
        yield from iter_file_documents(p)
