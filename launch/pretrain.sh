#!/usr/bin/env bash
# Launch `sigma-moe train` on N processes per node with the DeepSpeed launcher.
#
#   launch/pretrain.sh --nproc N CONFIG [--out DIR] [--set key=value ...] [--resume auto|PATH|none]
#
# One node with GPUs : N processes, one per GPU (NCCL).
# CPU-only machine   : N gloo processes on DeepSpeed's CPU accelerator, cores split between them.
# Many nodes         : --hostfile FILE (passwordless ssh + pdsh, DeepSpeed's default), or
#                      --slurm inside an sbatch allocation (one task per node; see slurm.sbatch),
#                      or --hostfile FILE --node-rank R --master-addr HOST on every node by hand.
# See launch/README.md for every form with the exact command.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/pretrain.sh --nproc N [launcher options] CONFIG [sigma-moe train options]

launcher options (before CONFIG):
  --nproc N             processes per node (GPUs per node; gloo processes on a CPU machine)
  --hostfile FILE       multi-node: MPI-style hostfile ("host slots=N" per line)
  --nnodes M            use the first M hosts of the hostfile
  --node-rank R         launch only this node's processes (no ssh; run once per node)
  --slurm               inside an sbatch allocation (one task per node): hostfile, node rank
                        and master address from SLURM_JOB_NODELIST / SLURM_NODEID
  --master-addr HOST    rendezvous host (default: 127.0.0.1 on one node, first host otherwise)
  --master-port PORT    rendezvous port (default: a free port on one node, 29500 otherwise)
  --launcher NAME       DeepSpeed multi-node backend: pdsh (default), openmpi, mvapich, slurm...
  --device auto|gpu|cpu force the GPU or the CPU (gloo) path (default: auto-detect CUDA)
  --torchrun            start the processes with torchrun instead of the DeepSpeed launcher
  --dry-run             print the command and exit
  -h, --help            this help

environment: PYTHON (interpreter; default: the checkout's .venv, else python3),
  OMP_NUM_THREADS (CPU path default: cores / N), DS_LAUNCHER_ARGS (extra deepspeed args).
everything from CONFIG on is passed to `sigma-moe train` unchanged.
EOF
}

NPROC="" HOSTFILE="" NNODES="" NODE_RANK="" SLURM=0 MASTER_ADDR_ARG="" MASTER_PORT_ARG=""
LAUNCHER="" DEVICE="auto" USE_TORCHRUN=0 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--nproc_per_node|--num_gpus) NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#*=}"; shift ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --master-addr) MASTER_ADDR_ARG="$2"; shift 2 ;;
    --master-port) MASTER_PORT_ARG="$2"; shift 2 ;;
    --launcher) LAUNCHER="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --torchrun) USE_TORCHRUN=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "pretrain.sh: unknown option $1 (launcher options go before CONFIG)" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then echo "pretrain.sh: missing CONFIG" >&2; usage >&2; exit 2; fi
if [[ -z "$NPROC" ]]; then echo "pretrain.sh: --nproc N is required" >&2; exit 2; fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then echo "pretrain.sh: --nproc must be a positive integer, got '$NPROC'" >&2; exit 2; fi
if [[ ! -f "$1" ]]; then echo "pretrain.sh: config file '$1' not found" >&2; exit 2; fi
TRAIN_ARGS=("$@")

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
  else PYTHON="$(command -v python3 || command -v python)"; fi
fi

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [[ "$DEVICE" == "auto" ]]; then
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DEVICE=gpu
  else
    DEVICE=cpu
  fi
fi

# SLURM: one task per node; every task derives the same hostfile and its own node rank.
if [[ "$SLURM" == 1 ]]; then
  : "${SLURM_JOB_NODELIST:?--slurm needs SLURM_JOB_NODELIST (run it under srun inside sbatch)}"
  if command -v scontrol >/dev/null 2>&1; then
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    IFS=',' read -r -a HOSTS <<< "$SLURM_JOB_NODELIST"
  fi
  HOSTFILE="${TMPDIR:-/tmp}/sigma-moe-hostfile.${SLURM_JOB_ID:-$$}.${SLURM_NODEID:-0}"
  : > "$HOSTFILE"
  for h in "${HOSTS[@]}"; do echo "$h slots=$NPROC" >> "$HOSTFILE"; done
  NODE_RANK="${SLURM_NODEID:-0}"
  NNODES="${SLURM_NNODES:-${#HOSTS[@]}}"
  MASTER_ADDR_ARG="${MASTER_ADDR_ARG:-${HOSTS[0]}}"
  MASTER_PORT_ARG="${MASTER_PORT_ARG:-29500}"
fi

if [[ -z "$HOSTFILE" ]]; then
  MASTER_ADDR_ARG="${MASTER_ADDR_ARG:-127.0.0.1}"
  MASTER_PORT_ARG="${MASTER_PORT_ARG:-$(free_port)}"
else
  if [[ ! -f "$HOSTFILE" ]]; then echo "pretrain.sh: hostfile '$HOSTFILE' not found" >&2; exit 2; fi
  MASTER_PORT_ARG="${MASTER_PORT_ARG:-29500}"
fi

if [[ "$DEVICE" == "cpu" ]]; then
  # gloo processes share the cores: one OpenMP pool per process, no oversubscription.
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    CORES="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
  fi
  export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
fi

if [[ "$USE_TORCHRUN" == 1 ]]; then
  CMD=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC"
       --master_addr "$MASTER_ADDR_ARG" --master_port "$MASTER_PORT_ARG")
  if [[ -n "$HOSTFILE" ]]; then
    N_HOSTS="${NNODES:-$(grep -cvE '^\s*(#|$)' "$HOSTFILE")}"
    CMD+=(--nnodes "$N_HOSTS" --node_rank "${NODE_RANK:?--torchrun with a hostfile needs --node-rank}")
  fi
  CMD+=(-m sigma_moe train "${TRAIN_ARGS[@]}")
else
  CMD=("$PYTHON" -m deepspeed.launcher.runner --no_local_rank --master_port "$MASTER_PORT_ARG")
  if [[ -n "$HOSTFILE" ]]; then
    CMD+=(--hostfile "$HOSTFILE" --num_gpus "$NPROC")
    [[ -n "$NNODES" ]] && CMD+=(--num_nodes "$NNODES")
    [[ -n "$MASTER_ADDR_ARG" ]] && CMD+=(--master_addr "$MASTER_ADDR_ARG")
    [[ -n "$NODE_RANK" ]] && CMD+=(--no_ssh --node_rank "$NODE_RANK")
    [[ -n "$LAUNCHER" ]] && CMD+=(--launcher "$LAUNCHER")
  else
    # One node: DeepSpeed ignores a hostfile-less --master_addr (uses 127.0.0.1).
    CMD+=(--num_gpus "$NPROC")
  fi
  # shellcheck disable=SC2206
  [[ -n "${DS_LAUNCHER_ARGS:-}" ]] && CMD+=(${DS_LAUNCHER_ARGS})
  CMD+=(--module sigma_moe train "${TRAIN_ARGS[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  [[ "$DEVICE" == "cpu" ]] && printf 'OMP_NUM_THREADS=%s ' "$OMP_NUM_THREADS"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
echo "pretrain.sh: $DEVICE, $NPROC process(es) per node: ${CMD[*]}" >&2
if ! command -v setsid >/dev/null 2>&1; then
  exec "${CMD[@]}"
fi
# The launcher and every rank run in their own process group, and a SIGTERM/SIGINT sent to this
# script (scheduler, `kill`, `timeout`, Ctrl-C) goes to all of them at once: each rank finishes
# its step and checkpoints. (Sent to DeepSpeed's runner alone, SIGTERM would kill only the runner
# and orphan the ranks; its launch.py forwards to one rank at a time.)
setsid "${CMD[@]}" &
CHILD=$!
forward() { kill -s "$1" -- "-$CHILD" 2>/dev/null || kill -s "$1" "$CHILD" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
STATUS=0
while true; do
  wait "$CHILD" && STATUS=0 || STATUS=$?
  kill -0 "$CHILD" 2>/dev/null || break  # wait returned because of a trapped signal: keep waiting
done
# The runner can exit before the ranks it started (e.g. killed by the forwarded signal while
# they still write their checkpoint): return only when the whole process group is gone.
while kill -0 -- "-$CHILD" 2>/dev/null; do sleep 1; done
exit "$STATUS"
