"""Is a checkpoint folder whole? Finding checkpoints, the manifest's content checksums and the
checks run before anything reads one (`--resume`, `eval`, `generate`, a Rho-1 reference,
`convert-checkpoint`), plus the finiteness check of weights before they are saved.

Manifest (in meta.json, written last at save time): `files` maps every file to its size and
`checksums` to its sha256. Sizes alone let a same-size corruption of a tensor record through
(issue 15: `eval` on one printed clean_val_loss 85.39 instead of 8.55 with exit 0), so the
content is hashed. sha256 (hashlib, ~700 MB/s on this machine's one core; crc32 would be ~1.6
GB/s but zip entries already carry one and a manifest hash also covers the yaml/json files)
costs about 1.5 s per GB at save and at load. Checkpoints older than `checksums` fall back to
the CRC32 of every zip entry (`ZipFile.testzip`, which torch archives carry).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch

from sigma_moe.train.fs import log

META = "meta.json"
UNIVERSAL = "universal_state.pt"  # layout-free state written by `sigma-moe convert-checkpoint`


def _is_final_name(p: Path) -> bool:
    n = p.name
    return n.startswith("step_") and n[5:].isdigit()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders with a final name (`step_<N>`, no temporary suffix), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _is_final_name(p)]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def file_sha256(f: Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_manifest(folder: Path) -> dict[str, dict]:
    """`files` (name → size) and `checksums` (name → sha256) of every file but meta.json."""
    names = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name != META)
    return {
        "files": {n: (folder / n).stat().st_size for n in names},
        "checksums": {n: file_sha256(folder / n) for n in names},
    }


def _zip_problem(f: Path) -> str | None:
    """torch.save writes zip archives: a truncated one has no readable central directory, a
    damaged record fails its CRC32."""
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        return f"{f.name} is not a readable torch archive ({e}; truncated or damaged)"
    if bad is not None:
        return f"{f.name}: record {bad!r} fails its CRC check (damaged)"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (None = it is whole). Reads meta.json, compares every file of
    its manifest with the recorded size and sha256 (older checkpoints: each .pt archive's
    entry CRCs); it does not build tensors."""
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        return f"no {META} (the save did not finish)"
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{META} is unreadable ({e})"
    if not isinstance(meta, dict):
        return f"{META} is not a JSON object"
    files = meta.get("files")
    if files is None:  # older checkpoints without a manifest: the files we know must exist
        need = ["mp_rank_00_model_states.pt"] if meta.get("format") != "universal" else [UNIVERSAL]
        files = {n: None for n in need}
    sums = meta.get("checksums") or {}
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written (truncated or damaged)"
        if name in sums:
            if file_sha256(f) != sums[name]:
                return f"{name} does not match its sha256 in {META} (its content is damaged)"
        elif name.endswith(".pt"):
            problem = _zip_problem(f)
            if problem:
                return problem
    return None


def resolve_checkpoint(path: str | Path, *, warn: bool = True) -> Path:
    """A run's `checkpoints/` folder or run folder (→ its newest complete, undamaged checkpoint,
    skipping damaged ones with a warning naming them), or one checkpoint folder (checked).
    Raises FileNotFoundError naming the path."""
    p = Path(path)
    if (p / "checkpoints").is_dir() and not (p / META).exists():
        p = p / "checkpoints"
    if (p / META).is_file() or (_is_final_name(p) and p.is_dir()):
        problem = checkpoint_problem(p)
        if problem:
            raise FileNotFoundError(f"checkpoint {p} cannot be loaded: {problem}")
        return p
    cands = list_checkpoints(p)
    latest = p / "latest"
    if not cands:
        raise FileNotFoundError(
            f"no checkpoint at {p}: expected a checkpoints/ folder holding step_* checkpoints "
            f"or a checkpoint folder holding {META}"
        )
    for c in cands:
        problem = checkpoint_problem(c)
        if problem is None:
            if warn and latest.is_file() and latest.read_text().strip() != c.name:
                log(
                    f"[resume] warning: {latest} names {latest.read_text().strip()!r}, "
                    f"using {c.name} (the newest complete checkpoint)"
                )
            return c
        if warn:
            log(f"[resume] warning: skipping damaged checkpoint {c}: {problem}")
    raise FileNotFoundError(f"no loadable checkpoint under {p}: every candidate is damaged")


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding a NaN or Inf (None = all finite)."""
    for n, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return n.removeprefix("_orig_mod.")
    return None
