#!/usr/bin/env bash
# Launch training with torchrun on this node: scripts/launch.sh CONFIG [--set key=value ...] [--dry-run]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (scripts/slurm/train.sbatch does).
# GPUS_PER_NODE (default: the GPUs nvidia-smi lists) starts one process per GPU; GPUS_PER_NODE=0 (or no GPU here)
# starts CPU_PROCS_PER_NODE (default 1) processes over gloo, which run the local loop.
# USR1 or TERM to this script makes the workers, and only them, finish their step, save and stop.
set -euo pipefail

CONFIG=${1:-}
if [[ -z "$CONFIG" || ! -f "$CONFIG" ]]; then
  echo "usage: scripts/launch.sh CONFIG [--set key=value ...] [--dry-run]  (CONFIG: a file in configs/; got '${CONFIG}')" >&2
  exit 2
fi
shift

DRY_RUN=0
for arg in "$@"; do
  [[ "$arg" != "--dry-run" ]] || DRY_RUN=1
done

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  if [[ "$GPUS_PER_NODE" -eq 0 && "$DRY_RUN" -eq 1 ]]; then  # a login node: plan for the nodes the job asks for
    GPUS_PER_NODE=$(sed -n 's/^#SBATCH --gpus-per-node=//p' "$(dirname "$0")/slurm/train.sbatch")
  fi
fi
PROCS_PER_NODE=$GPUS_PER_NODE
[[ "$GPUS_PER_NODE" -gt 0 ]] || PROCS_PER_NODE=${CPU_PROCS_PER_NODE:-1}
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
  --nproc-per-node "$PROCS_PER_NODE"
  --master-addr "$MASTER_ADDR"
  --master-port "$MASTER_PORT"
)
# torchrun writes each worker's output to a file under LOG_DIR and copies it to the console: no pipe that a
# signal can break under the workers while they save.
LOG_ARGS=(--log-dir "$LOG_DIR" --tee 3)
TRAINING_ARGS=(--config "$CONFIG" "$@")

if [[ "$DRY_RUN" -eq 1 ]]; then  # checks the layout for the whole job on CPU, starts nothing
  exec python -m megatron_simreg.train "${TRAINING_ARGS[@]}" --world-size $((NNODES * PROCS_PER_NODE)) \
    --gpus-per-node "$PROCS_PER_NODE"
fi

# A stop request goes to the workers as SIGTERM (both training loops finish the step, save and exit 143), not to
# torchrun: torchrun would forward it and then kill them after its own 30 s, however long the save takes.
# torchrun and its workers ignore USR1, which Slurm sends to every process of the step.
echo "launch.sh: node $NODE_RANK of $NNODES, $PROCS_PER_NODE processes, rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
TORCHRUN=0
# shellcheck disable=SC2329  # called by the trap
stop_workers() {
  echo "launch.sh: asking the workers to finish their step and save" >&2
  [[ "$TORCHRUN" -eq 0 ]] || pkill -TERM -P "$TORCHRUN" || true
}
trap stop_workers USR1 TERM
# megatron_simreg.launch is torchrun that exits 143 (not 1 with a traceback) when the workers stopped on SIGTERM.
(trap '' USR1; exec python -m megatron_simreg.launch "${DISTRIBUTED_ARGS[@]}" "${LOG_ARGS[@]}" \
  -m megatron_simreg.train "${TRAINING_ARGS[@]}") &
TORCHRUN=$!
status=0
wait "$TORCHRUN" || status=$?
while kill -0 "$TORCHRUN" 2>/dev/null; do  # a trap ended the wait: wait for torchrun itself
  status=0
  wait "$TORCHRUN" || status=$?
done
exit "$status"
