"""Backend resolution shared by every op family.

Backends:

* ``"torch"``     -- plain torch ops; runs on any device and is the fast CPU path.
* ``"triton"``    -- the Triton kernels compiled for CUDA (tensors must be on a CUDA device).
* ``"interpret"`` -- the *same* Triton kernels run by Triton's interpreter on CPU tensors (for
  tests).  Triton decides interpreter vs compiler when it is first imported, so
  ``TRITON_INTERPRET=1`` must be in the environment before anything imports triton.
* ``"auto"``      -- ``"triton"`` for CUDA tensors (when triton is importable), else ``"torch"``.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "interpret")

try:  # triton is optional: a CPU-only install (e.g. macOS) has no triton
    import triton  # noqa: F401
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is pinned in requirements
    HAS_TRITON = False


def triton_is_interpreted() -> bool:
    """True when triton was imported in interpreter mode (TRITON_INTERPRET=1 at import)."""
    if not HAS_TRITON:
        return False
    return type(tl.standard.max).__name__ == "InterpretedFunction"


def interpret_error_message() -> str | None:
    """None when the interpreter backend can run, else why not (with the fix)."""
    if not HAS_TRITON:
        return "backend='interpret' needs triton installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "backend='interpret' runs the Triton kernels in Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton (or anything importing it, "
            "e.g. megatron-core or sigma_moe_kernels) is imported, e.g. "
            "`TRITON_INTERPRET=1 python ...`"
        )
    if not triton_is_interpreted():
        return (
            "backend='interpret': TRITON_INTERPRET=1 is set now but triton was imported before "
            "it was set, so its kernels are compiled; set TRITON_INTERPRET=1 before the first "
            "import of triton (in the shell / CI command)"
        )
    return None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a user-facing backend name to one of "torch", "triton", "interpret".

    Raises ValueError for an unknown name or a device mismatch and RuntimeError when the
    interpreter was asked for but is not active.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    is_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if (is_cuda and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs triton installed")
        if not all(t.is_cuda for t in tensors):
            raise ValueError(
                "backend='triton' needs CUDA tensors; use backend='torch' (fast CPU path) or "
                "backend='interpret' (Triton interpreter, TRITON_INTERPRET=1) on CPU"
            )
        return "triton"
    if backend == "interpret":
        msg = interpret_error_message()
        if msg is not None:
            raise RuntimeError(msg)
        if is_cuda:
            raise ValueError("backend='interpret' runs on CPU tensors; got CUDA tensors")
        return "interpret"
    return "torch"


def check_tile(name: str, value: int) -> None:
    """GPU-legal tile: every tl.dot dimension must be a power of two >= 16.

    The interpreter accepts smaller dot shapes that the GPU compiler rejects, so launchers
    assert this to keep the interpreter tier honest.
    """
    assert value >= 16 and (value & (value - 1)) == 0, (
        f"{name}={value}: tl.dot tiles must be powers of two >= 16 to compile on a GPU"
    )


def check_block(name: str, value: int) -> None:
    """Non-dot block sizes only need to be powers of two (tl.arange requirement)."""
    assert value >= 1 and (value & (value - 1)) == 0, f"{name}={value} must be a power of two"
