#!/usr/bin/env bash
# Table 1 in miniature on a CPU: the six runs of table1_baselines.sh with the tiny LLaMA on the demo's
# corpus, then their comparison (runs/table1_tiny/comparison.md and .png). Prints the commands; RUN=1 runs
# them, writing the demo's corpus first if it is missing. ITERS (default 200) sets the training iterations.
set -euo pipefail
source "$(dirname "$0")/common.sh"
python=${PYTHON:-python}
runs=()
if [[ "${RUN:-0}" == 1 ]]; then
  "$python" -c 'from megatron_simreg.demo import prepare_demo_data; prepare_demo_data()'
fi
for run in "${TABLE1_RUNS[@]}"; do
  table1_settings "$run"
  local_job table1_tiny "tiny-${run}" configs/tiny-llama.yaml --set "schedule.train_iters=${ITERS:-200}" "${SETTINGS[@]}"
  runs+=("runs/table1_tiny/tiny-${run}")
done
compare=("$python" tools/compare_runs.py "${runs[@]}" --out runs/table1_tiny)
if [[ "${RUN:-0}" == 1 ]]; then "${compare[@]}"; else echo "${compare[*]}"; fi
