#!/usr/bin/env bash
# Launch training with torchrun on this node: scripts/launch.sh CONFIG [--set key=value ...] [--dry-run]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (scripts/slurm/train.sbatch does).
set -euo pipefail

CONFIG=${1:-}
if [[ -z "$CONFIG" || ! -f "$CONFIG" ]]; then
  echo "usage: scripts/launch.sh CONFIG [--set key=value ...] [--dry-run]  (CONFIG: a file in configs/; got '${CONFIG}')" >&2
  exit 2
fi
shift

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi
LOG_DIR=${LOG_DIR:-runs/logs}
mkdir -p "$LOG_DIR"

# What Megatron wants: one connection per device so communication and compute overlap in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=1

DISTRIBUTED_ARGS=(
  --nnodes "$NNODES"
  --node-rank "$NODE_RANK"
  --nproc-per-node "$GPUS_PER_NODE"
  --master-addr "$MASTER_ADDR"
  --master-port "$MASTER_PORT"
)
TRAINING_ARGS=(--config "$CONFIG" "$@")

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then  # checks the layout for the whole job on CPU, starts nothing
    exec python -m megatron_simreg.train "${TRAINING_ARGS[@]}" --world-size $((NNODES * GPUS_PER_NODE)) --gpus-per-node "$GPUS_PER_NODE"
  fi
done

torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_simreg.train "${TRAINING_ARGS[@]}" 2>&1 | tee -a "$LOG_DIR/node${NODE_RANK}.log"
