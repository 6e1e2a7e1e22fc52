"""Durable, atomic file writes: the one place (checkpoints, prepared-data meta files, the
tokenizer, the Rho-1 store's meta.json, the run report).

Every layer may import this module (it imports nothing of the package; the import-linter
contract "leaf modules" in pyproject.toml checks it), like ``sigma_moe.errors``.

``write_atomic`` writes a hidden temporary file in the target's folder (a rename only stays
atomic within one file system), fsyncs it, renames it over the target and fsyncs the folder, so
a reader sees the old or the new content, never a torn file, and the new name survives a power
loss. The temporary name carries the pid, so two processes writing the same file never share it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss; best effort (some file
    systems refuse to open or fsync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text is encoded as UTF-8) to `path` through a temporary file, fsync and a
    rename. An OSError names `path` (not the temporary file) and leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # OSError(errno, ...) keeps the subclass (FileNotFoundError, PermissionError, ...)
        raise OSError(e.errno, f"cannot write: {e.strerror or e}", str(path)) from e
    fsync_dir(path.parent)
