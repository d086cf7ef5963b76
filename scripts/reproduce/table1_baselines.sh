#!/usr/bin/env bash
# Table 1: SimReg against the four similarity baselines the paper adapts to pretraining (SimCSE, CPretrain,
# CReg, SCE) and the cross-entropy baseline, at 350M and 1.3B with the paper's settings. Every baseline sits
# on SimReg's plug point with its documented defaults (docs/baselines.md); SimReg is logged in all six runs.
set -euo pipefail
source "$(dirname "$0")/common.sh"
declare -A NODES=([llama2-350m]=4 [llama2-1.3b]=16)
for model in llama2-350m llama2-1.3b; do
  for run in "${TABLE1_RUNS[@]}"; do
    table1_settings "$run"
    job table1_baselines "${model}-${run}" "$model" "${NODES[$model]}" "${SETTINGS[@]}"
  done
done
