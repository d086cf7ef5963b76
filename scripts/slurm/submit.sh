#!/usr/bin/env bash
# Submit a run: scripts/slurm/submit.sh MODEL NODES [--set key=value ...]
#   MODEL: a config in configs/ (the paper's: llama2-350m | llama2-1.3b | llama2-3b | llama2-7b | mixtral-8x1b)
#   GPUS_PER_NODE=N asks for N GPUs a node instead of train.sbatch's 8; GPUS_PER_NODE=0 for none (a CPU
#   partition), with CPU_PROCS_PER_NODE processes a node. The job's log: runs/logs/simreg-MODEL-JOBID.out.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-}
NODES=${2:-}
CONFIG="configs/${MODEL}.yaml"
if [[ -z "$MODEL" || -z "$NODES" || ! -f "$CONFIG" ]]; then
  models=""
  for file in configs/*.yaml; do
    name=$(basename "$file" .yaml)
    [[ "$name" == base ]] || models+="$name "
  done
  echo "usage: scripts/slurm/submit.sh MODEL NODES [--set key=value ...] (MODEL: ${models})" >&2
  exit 2
fi
shift 2
mkdir -p runs/logs  # Slurm does not create the folder of --output: the job would fail before it starts
exec sbatch --nodes "$NODES" --job-name "simreg-${MODEL}" --output "runs/logs/%x-%j.out" \
  ${GPUS_PER_NODE:+--gpus-per-node "$GPUS_PER_NODE"} scripts/slurm/train.sbatch "$CONFIG" "$@"
