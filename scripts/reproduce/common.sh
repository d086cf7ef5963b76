#!/usr/bin/env bash
# Shared by the reproduce scripts: print each job, or submit it with SUBMIT=1.
job() {  # job EXPERIMENT NAME MODEL NODES [--set ...]
  local experiment=$1 name=$2 model=$3 nodes=$4
  shift 4
  local command=(scripts/slurm/submit.sh "$model" "$nodes" --set "name=${name}" --set "logging.run_dir=runs/${experiment}/${name}" "$@")
  if [[ "${SUBMIT:-0}" == 1 ]]; then "${command[@]}"; else echo "${command[*]}"; fi
}
