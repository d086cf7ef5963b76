#!/usr/bin/env bash
# Table 2: full vs chunk-wise SimReg (chunk 1024) at 7B.
set -euo pipefail
source "$(dirname "$0")/common.sh"
job full_vs_chunk llama2-7b-full llama2-7b 32 --set simreg.mode=full
job full_vs_chunk llama2-7b-chunk1024 llama2-7b 32 --set simreg.mode=chunk --set simreg.chunk_size=1024
