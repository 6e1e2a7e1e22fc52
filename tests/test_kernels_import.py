"""The kernels package is imported once, under one name, even when transformers looks for
Hugging Face's `kernels` library from the repo root.

The folder used to be `kernels/`: under `python -m ...` or pytest the repo root is on sys.path,
transformers' `is_kernels_available()` imported the folder a second time as `kernels`, that
re-defined every `sigma_moe::` custom op, and torch freed the first definitions, which the
first import's ops still pointed at (use after free: segfaults, `std::bad_alloc`,
`UnicodeDecodeError` from op calls in CI, only after a transformers model was loaded).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import importlib.util, sys
sys.path.insert(0, ".")  # what `python -m` and pytest do with the working directory
import sigma_moe_kernels  # noqa: F401  (defines the custom ops)
from torch._library.custom_ops import OPDEF_TO_LIB
libs = {q: lib for q, lib in OPDEF_TO_LIB.items() if q.startswith("sigma_moe::")}
spec = importlib.util.find_spec("kernels")
print("KERNELS_SPEC", None if spec is None else spec.origin)
from transformers.utils.import_utils import is_kernels_available
is_kernels_available()
import transformers.activations  # noqa: F401  (imports transformers' hub-kernels integration)
kept = [q for q, lib in libs.items() if OPDEF_TO_LIB.get(q) is lib and lib.m is not None]
print("OPS", len(libs), "KEPT", len(kept))
"""


def test_transformers_does_not_import_our_kernels_a_second_time():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("KERNELS", "OPS"))
    )
    origin = lines["KERNELS_SPEC"]
    assert origin == "None" or not origin.startswith(str(REPO)), origin
    n_ops, _, n_kept = lines["OPS"].split()
    assert int(n_ops) >= 7 and n_kept == n_ops, lines["OPS"]  # every op definition still alive
