#!/usr/bin/env bash
# Sec. 5.3: SimReg on the final hidden states vs intermediate layers, at 1.3B (24 layers).
set -euo pipefail
source "$(dirname "$0")/common.sh"
for layer in -1 5 11 17; do
  job layer_ablation "llama2-1.3b-layer${layer}" llama2-1.3b 16 --set "simreg.layer=${layer}"
done
