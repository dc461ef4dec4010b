#!/usr/bin/env bash
# FLUX.1-dev PureCC stage-B LoRA step on one H100/H200 (about 10 minutes): step time, peak memory,
# MFU, projected time of one concept. Run from the repository root with the project's environment.
# Extra flags go to benchmarks/accelerator.py (e.g. --base_quantization=int8, --remat=full).
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
timeout 600 python -m benchmarks.accelerator --resolutions=512,1024 --remat=dots_no_batch --attention=auto "$@"
