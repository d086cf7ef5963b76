#!/usr/bin/env bash
# Submit a paper model: scripts/slurm/submit.sh MODEL NODES [--set key=value ...]
#   MODEL: llama2-350m | llama2-1.3b | llama2-3b | llama2-7b | mixtral-8x1b
set -euo pipefail
MODEL=${1:-}
NODES=${2:-}
CONFIG="configs/${MODEL}.yaml"
if [[ -z "$MODEL" || -z "$NODES" || ! -f "$CONFIG" ]]; then
  models=""
  for file in configs/*.yaml; do
    name=$(basename "$file" .yaml)
    [[ "$name" == base || "$name" == tiny-* ]] || models+="$name "
  done
  echo "usage: scripts/slurm/submit.sh MODEL NODES [--set key=value ...] (MODEL: ${models})" >&2
  exit 2
fi
shift 2
exec ${SBATCH:-sbatch} --nodes "$NODES" --job-name "simreg-${MODEL}" scripts/slurm/train.sbatch "$CONFIG" "$@"
