"""The stderr log line of checkpoint / resume / NaN-policy messages (the file-system helpers
live in ``sigma_moe.fs``)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
