#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on the GPU machine, which has no network.
#
# That machine's image already holds torch, torchvision, lightning, torchmetrics, numpy, scipy, pillow, pyyaml,
# tqdm, typing-extensions, psutil and opencv-python-headless (crossflow uses only DIS flow from OpenCV's main
# module there), but not what is pinned below: the versions crossflow's tests ran with. wandb is left out: with
# the CSV logger nothing on gpu_check.sh's paths imports it (its dry run checks that).
# Its python3 is 3.12 (/work/.library/device/KINDS.md); PY_VERSIONS="3.11 3.12" adds others.
#
#     bash benchmarks/gpu_wheels.sh            # -> .gpu_wheels/ (git-ignored), about 40 MB
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
PY_VERSIONS=${PY_VERSIONS:-3.12}
PURE=(jsonargparse==4.53.0 omegaconf==2.4.0 docstring_parser==0.18.0 typeshed_client==2.15.0
      webdataset==1.0.2 braceexpand==0.1.7)
BINARY=(av==18.1.0 zstandard==0.25.0 lz4==4.4.5)
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
$PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST" "${PURE[@]}"
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for version in $PY_VERSIONS; do
  $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
    --python-version "$version" "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
done
ls -l "$DEST"
du -sh "$DEST"
