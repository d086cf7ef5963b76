#!/usr/bin/env bash
# Shared by the reproduce scripts: print each job, or submit it with SUBMIT=1.
job() {  # job EXPERIMENT NAME MODEL NODES [--set ...]
  local experiment=$1 name=$2 model=$3 nodes=$4
  shift 4
  local command=(scripts/slurm/submit.sh "$model" "$nodes" --set "name=${name}" --set "logging.run_dir=runs/${experiment}/${name}" "$@")
  if [[ "${SUBMIT:-0}" == 1 ]]; then "${command[@]}"; else echo "${command[*]}"; fi
}

local_job() {  # local_job EXPERIMENT NAME CONFIG [--set ...]: print the command, or run it here with RUN=1
  local experiment=$1 name=$2 config=$3
  shift 3
  local command=("${PYTHON:-python}" -m megatron_simreg.train --config "$config" --set "name=${name}"
    --set "logging.run_dir=runs/${experiment}/${name}" "$@")
  if [[ "${RUN:-0}" == 1 ]]; then "${command[@]}"; else echo "${command[*]}"; fi
}

# Table 1's six runs: the cross-entropy baseline (SimReg logged at lambda 0), the four baselines, SimReg.
# shellcheck disable=SC2034  # TABLE1_RUNS and SETTINGS are read by the scripts that source this file
TABLE1_RUNS=(baseline simcse cpretrain creg sce simreg)
# shellcheck disable=SC2034
table1_settings() {  # table1_settings RUN: sets SETTINGS to that run's --set arguments
  case $1 in
    baseline) SETTINGS=(--set simreg.weight=0) ;;
    simreg) SETTINGS=(--set simreg.weight=auto) ;;
    *) SETTINGS=(--set "regularizer.name=$1") ;;
  esac
}
