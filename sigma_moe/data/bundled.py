"""The bundled corpus, prepared once and cached: ``ensure_bundled_data() -> Path``.

Layout of the returned folder (``<cache>/bundled-v<version>-<tokenizer fingerprint[:12]>``)::

    corpus/<domain>.jsonl                  the generated text
    <domain>.bin/.idx/.meta.json           training split   (prefix <dir>/<domain>)
    <domain>-val.bin/.idx/.meta.json       validation split (prefix <dir>/<domain>-val)
    COMPLETE.json                          marker written last

The cache root is ``cache_dir``, else ``$SIGMA_MOE_CACHE``, else ``~/.cache/sigma-moe``.
Concurrent callers (several ranks, the scorer, tests) serialise on an ``fcntl.flock`` lock; the
build goes into a temporary folder that is renamed into place, so a reader never sees a
half-written dataset, and a folder without the marker is rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from sigma_moe.data.corpus import CLEAN_DOMAINS, CORPUS_VERSION, DEFAULT_SEED, DOMAINS, corpus_docs
from sigma_moe.data.prepare import prepare_docs
from sigma_moe.data.tokenizer import load_tokenizer

BUNDLED_VAL_FRACTION = 0.05
_MARKER = "COMPLETE.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SIGMA_MOE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sigma-moe"


@contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` body."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    if not (d / _MARKER).is_file():
        return False
    return all(
        Path(f"{d / name}{suffix}").is_file()
        for dom in DOMAINS
        for name in (dom, f"{dom}-val")
        for suffix in (".bin", ".idx", ".meta.json")
    )


def bundled_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``ensure_bundled_data`` puts (or has put) the bundled datasets; builds nothing."""
    tok = load_tokenizer("bundled")
    return cache_root(cache_dir) / f"bundled-v{CORPUS_VERSION}-{tok.fingerprint[:12]}"


def ensure_bundled_data(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the folder holding the four bundled domains' prefixes.

    ``<dir>/<domain>`` and ``<dir>/<domain>-val`` for ``domain`` in prose, code, math, webnoise.
    Idempotent and safe to call from several processes at once; ~10 s the first time.
    """
    tok = load_tokenizer("bundled")
    root = cache_root(cache_dir)
    final = root / f"bundled-v{CORPUS_VERSION}-{tok.fingerprint[:12]}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".bundled.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        t0 = time.time()
        for stale in root.glob(".tmp-bundled-*"):  # left by a build that crashed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        (tmp / "corpus").mkdir(parents=True)
        docs = corpus_docs(DEFAULT_SEED)
        summary = {}
        for name in DOMAINS:
            with open(tmp / "corpus" / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for d in docs[name]:
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            prepare_docs(
                docs[name],
                name,
                tmp,
                tok,
                val_fraction=BUNDLED_VAL_FRACTION,
                seed=DEFAULT_SEED,
                extra_meta={"inputs": [f"bundled:{name}"], "clean": name in CLEAN_DOMAINS},
            )
            meta = json.loads((tmp / f"{name}.meta.json").read_text())
            summary[name] = {
                k: meta[k] for k in ("num_docs", "num_tokens", "val_num_docs", "val_num_tokens")
            }
        marker = {
            "corpus_version": CORPUS_VERSION,
            "tokenizer_fingerprint": tok.fingerprint,
            "seed": DEFAULT_SEED,
            "domains": summary,
            "clean_domains": sorted(CLEAN_DOMAINS),
            "build_seconds": round(time.time() - t0, 2),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if final.exists():  # incomplete leftover of a crashed build
            shutil.rmtree(final)
        os.rename(tmp, final)
    return final


def bundled_prefix(
    domain: str, cache_dir: str | os.PathLike | None = None, val: bool = False
) -> str:
    """The prefix of one bundled domain (building the cache if needed)."""
    if domain not in DOMAINS:
        raise ValueError(
            f"unknown bundled domain {domain!r}; the bundled corpus has {', '.join(DOMAINS)}"
        )
    d = ensure_bundled_data(cache_dir)
    return str(d / (f"{domain}-val" if val else domain))
