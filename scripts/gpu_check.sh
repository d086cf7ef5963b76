#!/usr/bin/env bash
# The one-shot GPU check: run it on a lent GPU machine (torch and triton there, no network); at most 9 minutes.
# Wheels carried beside the checkout in .whl/ are installed first (`scripts/gpu_check.sh --wheels` prints the
# command that downloads every package the checks need besides torch and triton; `--dry-run` there says which
# are missing); then every check of megatron_simreg/gpu_check.py runs and the report goes to
# docs/gpu-validation.md, or to $OUT/gpu-validation.md where the machine collects $OUT. `--dry-run` checks the
# pieces on any machine.
#
#   scripts/gpu_check.sh [--dry-run | --wheels] [--data PREFIX] [--output FILE] [--deadline SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1

args=()
if [[ -n "${OUT:-}" ]]; then
  args+=(--output "$OUT/gpu-validation.md")
fi
exec "${PYTHON:-python3}" -m megatron_simreg.gpu_check "${args[@]}" "$@"
