"""One run per run folder: `<run>/.lock` holds the pid (and host) of the run that owns the folder.

Two `train` commands into one `--out` used to interleave their steps in metrics.jsonl and
replace each other's checkpoints (issue 15). The lock is an advisory `fcntl.flock` on the lock
file, so the kernel releases it when the holder dies in any way (SIGKILL included): a dead run
never leaves the folder stuck, and no pid-liveness guess is needed. The pid in the file is only
for the message. (flock works on local disks; on NFS it may not, then the lock is advisory only.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from sigma_moe.data.textio import check_output_folder

LOCK_NAME = ".lock"


class RunFolderLocked(ValueError):
    """Another live run holds the run folder; the message names its pid."""


def check_run_folder(out_dir: Path) -> None:
    """A run folder must be a folder (or not exist yet): name the path otherwise."""
    check_output_folder(out_dir, "run folder (--out)")


class RunLock:
    """`with RunLock(out_dir):` — create the folder and own it for the block."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        check_run_folder(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise RunFolderLocked(
                f"run folder {str(self.out_dir)!r} is in use by another run ({holder}); wait for "
                "it to finish, stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
