#!/usr/bin/env bash
# Prepare everything benchmarks/device_check.sh needs on a CUDA machine without network, into the
# git-ignored folder .device/ (pass it to the device tool's `carry`):
#   .device/wheels  this project's runtime dependencies that such a machine lacks (it has torch,
#                   torchvision, numpy, pillow, timm, typer, rich, tqdm, fsspec, matplotlib, opencv);
#                   wheels for CPython 3.12 on x86-64 Linux, the same versions as installed here
#   .device/data    the real test data the GPU tests and the benchmarks read (../shared is not carried)
# Run it here (a CPU machine that reaches the package registry), from anywhere:
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]      # default 3.12, the device image's Python
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
dest=.device
rm -rf "$dest/wheels" && mkdir -p "$dest/wheels" "$dest/data"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || grep -qx '/.device/' .gitignore || echo '/.device/' >> .git/info/exclude

# pinned to what this checkout is tested with (pip show), so both machines run the same code
version() { python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pkgs=()
for name in open_clip_torch ftfy wcwidth segment-anything pycocotools lvis; do
  v="$(version "$name")"
  [ -n "$v" ] || { echo "fetch_wheels: $name is not installed here (pip install -e '.[test]' first)" >&2; exit 2; }
  pkgs+=("$name==$v")
done
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$dest/wheels" "${pkgs[@]}"

shared="${OVSAM_TEST_DATA:-../shared/data}"
for d in coco-val2017-mini coco-detections-sample clip-text-embeddings; do
  rm -rf "$dest/data/$d" && cp -r "$shared/$d" "$dest/data/$d"
done
ls "$dest/wheels"
du -sh "$dest"
