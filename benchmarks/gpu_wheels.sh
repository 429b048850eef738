#!/usr/bin/env bash
# Run HERE (where pip reaches the package registry), before a GPU session's one device call:
# downloads into .wheels/ (git-ignored) the wheels that the GPU machine's image lacks, for its
# Python 3.12 on x86-64. That image already holds torch, torchvision, timm, numpy, rich, click,
# safetensors, xarray, pandas, matplotlib, huggingface_hub and pyyaml (KINDS.md of the device
# tool); what safe-cache needs beyond them is listed below, at the versions CI uses. timm and
# xarray are carried too, at CI's versions (the MAP heads need a recent timm). Then call the
# device with
#   carry: [".wheels"]    command: bash benchmarks/gpu.sh --wheels .wheels --out $OUT/gpu.json
# (gpu.sh installs them and safe-cache itself into /tmp/site, then runs the check).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 timm==1.0.31
    zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0
    dask==2026.8.0 partd==1.4.2 locket==1.0.0
    distributed==2026.8.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
    rich-click==1.9.9 xarray==2026.9.0
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf .wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .wheels "${PACKAGES[@]}"
du -sh .wheels
