#!/usr/bin/env bash
# The prepared device check: safe-cache's hot paths on one accelerator, one JSON document on
# stdout, progress on stderr, exit 1 on an error or an exactness figure over its tolerance.
#   bash benchmarks/gpu.sh                # CUDA, the full settings (under 8 minutes on one GPU)
#   bash benchmarks/gpu.sh --device cpu   # short settings of the same code: CI runs this
# See benchmarks/gpu.py for what each section measures.
#   bash benchmarks/gpu.sh --out $OUT/gpu.json   # also write the document there, section by
#                                                # section (a run cut short keeps what it did)
#   bash benchmarks/gpu.sh --wheels .wheels --out $OUT/gpu.json   # on the GPU machine
# --wheels DIR (first): install DIR's wheels (made here by benchmarks/gpu_wheels.sh: what the
# GPU machine's image lacks) and safe-cache itself into /tmp/site first (no network there).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
    wheels="$2"
    shift 2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target /tmp/site .
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1  # nothing can be reached from there
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi
export PYTHONUNBUFFERED=1
exec timeout 480 python3 benchmarks/gpu.py "$@"
