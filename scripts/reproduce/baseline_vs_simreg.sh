#!/usr/bin/env bash
# Table 1: every model with and without SimReg (lambda 0 logs SimReg without training on it).
set -euo pipefail
source "$(dirname "$0")/common.sh"
declare -A NODES=([llama2-350m]=4 [llama2-1.3b]=16 [llama2-3b]=16 [llama2-7b]=32 [mixtral-8x1b]=8)
for model in llama2-350m llama2-1.3b llama2-3b llama2-7b mixtral-8x1b; do
  job baseline_vs_simreg "${model}-baseline" "$model" "${NODES[$model]}" --set simreg.weight=0
  job baseline_vs_simreg "${model}-simreg" "$model" "${NODES[$model]}" --set simreg.weight=auto
done
