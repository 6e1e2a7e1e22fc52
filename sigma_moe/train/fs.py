"""File-system helpers of checkpointing (one place): durable directory entries, atomic text
writes, and the stderr log line of checkpoint/resume messages."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fsync_dir(d: Path) -> None:
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


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the
    new content, never a torn file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
