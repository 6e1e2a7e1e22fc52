"""Tile configurations of the grouped-SwiGLU Triton GEMMs and the fp32 dot precision.

Kept apart from ``grouped_swiglu_triton.py`` (which holds the kernels and launchers) so the
tuning tables can change without touching kernel code; the `sm90` compile tier (``_sm90.py``)
compiles every entry.
"""

from __future__ import annotations

import os

import torch

from ._backend import HAS_TRITON, triton_is_interpreted

if HAS_TRITON:
    import triton

# Tile sizes.  BLOCK_M (rows of one expert per tile) is fixed because the device-side tile
# schedule depends on it; 64 suits fine-grained experts (~85 rows each at T=8192, E=96 top-1).
# The other tile sizes are autotuned on a GPU from small config sets, each of which compiles for
# sm_90a to wgmma (bf16) with no register spills and fits shared memory: the `sm90` test tier
# (tests/kernels/test_sm90_compile.py) checks every one of them and the launchers' other choices.
# Under the interpreter one config (the 64x64x32 tiles the CPU tests were tuned with) is used.
_BLOCK_M = 64

_INTERPRETED = triton_is_interpreted()


def _cfg(w: int, s: int, **tiles):
    return triton.Config(tiles, num_warps=w, num_stages=s)


# Config sets per GEMM role and operand width, from the sm_90a compile (registers / spills /
# shared memory per config: docs/benchmarks/2026-12-01-sm90-compile.md).  What did not work:
# BLOCK_N=128 at 4 warps for dA (SwiGLU epilogue: 1.1 KB spills) and dX (two products: 52 B),
# and every 64x64+ tile in fp32 with tf32x3 at 4 warps (3 MMAs per product: 255 registers,
# 0.1-1.9 KB spills; the dX one needed 256 KB of shared memory at 3 stages).
_ROLES = ("gate_up", "down", "dA", "dX", "dW2", "dW1")
if HAS_TRITON and _INTERPRETED:
    _INTERP_CFG = {"gate_up": _cfg(4, 3, BLOCK_N=64, BLOCK_K=32)}
    _INTERP_CFG.update(dict.fromkeys(("down", "dA", "dX"), _INTERP_CFG["gate_up"]))
    _INTERP_CFG.update(
        dict.fromkeys(("dW2", "dW1"), _cfg(4, 3, BLOCK_K=64, BLOCK_N=64, BLOCK_R=32))
    )
    _CONFIGS = {(r, w): [_INTERP_CFG[r]] for r in _ROLES for w in ("bf16", "fp32")}
elif HAS_TRITON:
    _WGRAD_BF16 = [
        _cfg(4, 3, BLOCK_K=64, BLOCK_N=128, BLOCK_R=64),
        _cfg(8, 3, BLOCK_K=128, BLOCK_N=128, BLOCK_R=64),
        _cfg(8, 4, BLOCK_K=128, BLOCK_N=128, BLOCK_R=32),
    ]
    _CONFIGS = {
        ("gate_up", "bf16"): [
            _cfg(4, 3, BLOCK_N=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_N=128, BLOCK_K=64),
            _cfg(4, 4, BLOCK_N=64, BLOCK_K=32),
        ],
        # down: 128x64 at 4 warps and 256x64 at 8 warps compile spill-free with Triton 3.9 but
        # spill 140 / 104 B with 3.6 (the GPU image's version)
        ("down", "bf16"): [
            _cfg(8, 3, BLOCK_N=128, BLOCK_K=64),
            _cfg(4, 4, BLOCK_N=64, BLOCK_K=64),
            _cfg(8, 4, BLOCK_N=128, BLOCK_K=32),
        ],
        ("dA", "bf16"): [
            _cfg(4, 4, BLOCK_N=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_N=128, BLOCK_K=64),
            _cfg(8, 4, BLOCK_N=64, BLOCK_K=64),
        ],
        ("dX", "bf16"): [
            _cfg(4, 4, BLOCK_N=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_N=128, BLOCK_K=64),
            _cfg(4, 3, BLOCK_N=64, BLOCK_K=32),
        ],
        # weight grads: 64x128 / 128x128 tiles of dW (dot M >= 64: wgmma; the 64x64x32 tiles
        # before compiled to mma.sync and launched ~110k programs at the Tiny shape)
        ("dW2", "bf16"): _WGRAD_BF16,
        ("dW1", "bf16"): _WGRAD_BF16,
        ("gate_up", "fp32"): [
            _cfg(8, 3, BLOCK_N=64, BLOCK_K=32),
            _cfg(4, 3, BLOCK_N=32, BLOCK_K=32),
        ],
        ("down", "fp32"): [_cfg(8, 3, BLOCK_N=64, BLOCK_K=32), _cfg(4, 3, BLOCK_N=64, BLOCK_K=16)],
        ("dA", "fp32"): [_cfg(8, 3, BLOCK_N=64, BLOCK_K=32), _cfg(4, 3, BLOCK_N=32, BLOCK_K=32)],
        ("dX", "fp32"): [_cfg(8, 2, BLOCK_N=64, BLOCK_K=32), _cfg(4, 3, BLOCK_N=32, BLOCK_K=32)],
        ("dW2", "fp32"): [
            _cfg(8, 3, BLOCK_K=64, BLOCK_N=64, BLOCK_R=32),
            _cfg(4, 3, BLOCK_K=64, BLOCK_N=32, BLOCK_R=32),
        ],
        ("dW1", "fp32"): [
            _cfg(4, 3, BLOCK_K=64, BLOCK_N=128, BLOCK_R=64),
            _cfg(8, 3, BLOCK_K=64, BLOCK_N=64, BLOCK_R=32),
        ],
    }

else:
    _CONFIGS = {}

# SIGMA_MOE_AUTOTUNE=0 (read at import): launch the first config of each set, no autotuning.
# For correctness runs such as the `gpu` test tier in scripts/gpu_check.sh, where every new
# (shape, dtype) would otherwise compile and time every config of every role.
if os.environ.get("SIGMA_MOE_AUTOTUNE", "1") == "0":
    _LAUNCH_CONFIGS = {key: cfgs[:1] for key, cfgs in _CONFIGS.items()}
else:
    _LAUNCH_CONFIGS = _CONFIGS

_ROLE_KERNEL = {"gate_up": "_gate_up_fwd_kernel", "down": "_gmm_kernel", "dA": "_gmm_kernel"}
_ROLE_KERNEL.update(dX="_gmm_kernel", dW2="_gmm_wgrad_kernel", dW1="_gmm_wgrad_kernel")
_ROLE_FLAGS = {
    "gate_up": {},
    "down": dict(HAS_SECOND=False, SWIGLU_BWD=False),
    "dA": dict(HAS_SECOND=False, SWIGLU_BWD=True),
    "dX": dict(HAS_SECOND=True, SWIGLU_BWD=False),
    "dW2": dict(HAS_SECOND=True),
    "dW1": dict(HAS_SECOND=False),
}


PRECISIONS = ("ieee", "tf32x3", "tf32")


def check_precision(precision: str | None) -> str:
    """The user's ``input_precision``: one of PRECISIONS, or None -> "auto" (resolved at launch
    by ``resolve_precision``, outside anything torch.compile traces)."""
    if precision is None or precision == "auto":
        return "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS} or None, got {precision!r}")
    return precision


def resolve_precision(dtype: torch.dtype, precision: str | None) -> str:
    """The tl.dot input precision for operands of `dtype`.

    fp32: `precision` unless "auto"/None, else torch's own matmul setting -- "highest"
    (torch's default) -> "tf32x3" (3 tf32 MMAs per product: fp32-level accuracy on the tensor
    cores; plain tf32 gave a max error of ~2e-3 in the fp32 tests, emulated), "high"/"medium" ->
    "tf32".  16-bit operands: "tf32" (the compiler ignores it for them).
    """
    precision = check_precision(precision)
    if dtype != torch.float32:
        return "tf32"
    if precision != "auto":
        return precision
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
