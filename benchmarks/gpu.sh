#!/usr/bin/env bash
# The prepared device check: safe-cache's hot paths on one accelerator, one JSON document on
# stdout, progress on stderr, exit 1 on an error or an exactness figure over its tolerance.
#   bash benchmarks/gpu.sh                # CUDA, the full settings (under 8 minutes on one GPU)
#   bash benchmarks/gpu.sh --device cpu   # short settings of the same code: CI runs this
# See benchmarks/gpu.py for what each section measures.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/gpu.py "$@"
