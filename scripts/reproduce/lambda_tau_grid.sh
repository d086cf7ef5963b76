#!/usr/bin/env bash
# The lambda / tau grid at 350M.
set -euo pipefail
source "$(dirname "$0")/common.sh"
for weight in 5 10 20 50; do
  for temperature in 0.01 0.05 0.1; do
    job lambda_tau_grid "llama2-350m-lambda${weight}-tau${temperature}" llama2-350m 4 \
      --set "simreg.weight=${weight}" --set "simreg.temperature=${temperature}"
  done
done
