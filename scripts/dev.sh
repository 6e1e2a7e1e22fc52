#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv and installs sigma-moe (idempotent: skipped
# when requirements.txt and setup.py are unchanged since the last install), then runs
#   demo [ARGS]  -> sigma-moe demo ARGS
#   test [ARGS]  -> the test suite (everything but `gpu`; Triton kernels under its interpreter)
#   install      -> only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.sigma-moe-installed"
want=$(cat requirements.txt setup.py | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[dev] installing into $VENV (torch is pinned to the local CPU build in requirements.txt)" >&2
  python3 -m venv "$VENV"
  # DS_BUILD_OPS=0: DeepSpeed's CUDA ops cannot build here; it JIT-builds what it needs on CPU.
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -r requirements.txt
  "$VENV/bin/pip" install -q --no-deps -e .
  echo "$want" > "$STAMP"
fi
cmd=${1:-help}
shift || true
case "$cmd" in
  install) ;;
  demo) exec "$VENV/bin/sigma-moe" demo "$@" ;;
  test)
    # TRITON_INTERPRET must be set before triton is first imported (megatron-core imports it).
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    exec "$VENV/bin/python" -m pytest -m "not gpu" "$@" ;;
  *) echo "usage: scripts/dev.sh {demo|test|install} [args]" >&2; exit 2 ;;
esac
