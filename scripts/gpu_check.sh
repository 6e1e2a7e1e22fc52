#!/usr/bin/env bash
# The first minutes on a Hopper GPU (H100 / H200), in under 6 minutes:
#   1. versions (python, torch, CUDA, Triton, the device);
#   2. the `gpu` test tier (tests/kernels on the triton backend);
#   3. the sm_90a compile report with this machine's Triton (registers / spills / wgmma);
#   4. the kernel + layer benchmark at the Sigma-MoE-Tiny shape (sigma_moe/bench/gpu_check.py):
#      gpu_check.json + gpu_check.md.
# Usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]      (default OUT_DIR: gpu_check_out)
# --dry-run: CPU, Triton interpreter, tiny shapes, the test tier only collected (CI runs this:
# tests/kernels/test_gpu_check_dry_run.py).  Needs only python with torch + triton (+ pytest
# for step 2): the GPU image has no DeepSpeed / megatron, so nothing else is imported.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ]; then
  PY="$REPO/.venv/bin/python"
fi
# sigma_moe and sigma_moe_kernels are folders of the checkout: importable without an install
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
status=0
step() { echo; echo "=== [gpu_check $(date -u +%H:%M:%S)] $*"; }

step "1/4 versions"
"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30),
          "| capability", f"{p.major}.{p.minor}")
else:
    print("device: none (CPU)")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "versions failed: torch / triton missing"; exit 1; }

step "2/4 gpu test tier"
if "$PY" -c "import pytest" 2>/dev/null; then
  if [ "$DRY" = 1 ]; then
    args=(--collect-only -q)
  else
    args=(-q -p no:cacheprovider)
  fi
  # SIGMA_MOE_AUTOTUNE=0: one config per GEMM role (correctness only; autotuning every test
  # shape would compile and time every config)
  SIGMA_MOE_AUTOTUNE=0 timeout 150 "$PY" -m pytest -m gpu tests/kernels "${args[@]}" 2>&1 \
    | tail -25 | tee "$OUT/pytest-gpu.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu tier FAILED (continuing to the benchmark)"; status=1; }
else
  echo "pytest is not installed for $PY: gpu tier skipped" | tee "$OUT/pytest-gpu.txt"
fi

step "3/4 sm_90a compile report (this machine's Triton)"
if [ "$DRY" = 1 ]; then
  echo "dry run: skipped (the sm90 test tier compiles on CPU)"
else
  SIGMA_MOE_SM90_CACHE=0 TRITON_INTERPRET= timeout 60 "$PY" -m sigma_moe_kernels._sm90 \
    --jobs "$(nproc)" --json "$OUT/sm90.json" --md "$OUT/sm90.md" || status=1
fi

step "4/4 kernel + layer benchmark"
bench=(-m sigma_moe.bench.gpu_check --out "$OUT")
[ "$DRY" = 1 ] && bench+=(--dry-run)
# time limits per step (150 + 60 + 150 s) keep the whole script under 6 minutes on the GPU; the
# interpreter's dry run on a shared CPU gets longer
limit=150; [ "$DRY" = 1 ] && limit=500
timeout $limit "$PY" "${bench[@]}" || { echo "benchmark FAILED"; status=1; }
step "done: $OUT/gpu_check.json, $OUT/gpu_check.md (status $status)"
exit $status
