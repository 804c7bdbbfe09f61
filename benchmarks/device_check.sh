#!/usr/bin/env bash
# The GPU check in one command, for a lent CUDA machine that has torch but no network and none of
# this project's other dependencies. Prepare on a CPU machine first: bash benchmarks/fetch_wheels.sh
# (it fills the git-ignored .device/ with wheels and the test data); carry .device; then run
#   bash benchmarks/device_check.sh [full|quick|smoke] [BUDGET_S]
# from the repository root. The whole check ends within BUDGET_S seconds (default 480, so that a
# device call of 600 s returns it with room to spare). Steps, most wanted first, each cut to what
# is left of the budget; everything goes to $OUT (default ./device-out), written as it is measured:
#   machine.txt                         torch, CUDA and the device's name
#   label_throughput.json / RESULTS.md  ovsam and the image-crop baseline first (the issue's ratio), 300 boxes per
#                                       image at image batch 8 (its memory target), then the plain path, the
#                                       feature-crop baseline, SAM alone and the rest of the sweep (full only)
#   pytest_gpu.log                      pytest -m gpu (the CUDA tests)
#   input_pipeline.json                 decoding and preparing images, to the GPU, float vs uint8 (full only)
#   everything_cuda.json                --everything vs SamAutomaticMaskGenerator (full only)
# smoke: the same steps on the CPU with tiny models, to check this script and the carried wheels on
# a machine like the device's (Python 3.12, its torch) before spending device time; needs no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-full}"
budget="${2:-480}"
case "$mode" in full|quick|smoke) ;; *) echo "device_check: mode is full, quick or smoke, not '$mode'" >&2; exit 2;; esac
OUT="${OUT:-device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OVSAM_TEST_DATA="$PWD/.device/data"
[ -d .device/wheels ] || { echo "device_check: no .device/wheels (run benchmarks/fetch_wheels.sh and carry .device)" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ovsam-site \
  .device/wheels/*.whl || exit 2
export PYTHONPATH="/tmp/ovsam-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$OUT/machine.txt"
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
if [ "$mode" = smoke ]; then
  device=cpu
  models=(--model tiny --baseline-variant tiny --rows ovsam,image-crop,feature-crop --n-images 4 --few-images 2
          --batch-size 2 --sweep)
  everything=(--model tiny --sam vit_b --points-per-side 8 --images 1)
else
  python3 -c "import torch; assert torch.cuda.is_available()" || { echo "device_check: no CUDA device" >&2; exit 2; }
  device=cuda
  # ~10 boxes per image; 480 images (the 48 of coco-val2017-mini ten times) so that a row lasts seconds, and JPEG
  # decoding in 8 workers keeps up with the GPU
  models=(--n-images 480 --few-images 48 --batch-size 8 --workers 8)
  [ "$mode" = quick ] && models+=(--rows ovsam,image-crop) || models+=(--plain --sweep)
  everything=(--images 4)
fi
status=0
data=.device/data/coco-val2017-mini
# deadlines (seconds of this script's age): the benchmark until t_bench, the CUDA tests until t_tests, --everything
# until the budget's end
if [ "$mode" = quick ]; then t_bench=$(( budget - 120 )); t_tests=$(( budget - 5 )); else t_bench=$(( budget - 250 )); t_tests=$(( budget - 130 )); fi
upto() { local s=$(( $1 - SECONDS )); [ "$s" -gt 1 ] && echo "$s" || echo 1; }
timeout "$(upto $t_bench)" python3 benchmarks/label_throughput.py --device "$device" \
  --images "$data/images" --ann "$data/instances.json" --boxes gt "${models[@]}" --budget "$(upto $(( t_bench - 45 )))" \
  --json "$OUT/label_throughput.json" --results "$OUT/RESULTS.md" || status=1
# modules needing the test-only extras (ray, moto, label-studio-sdk) fail to collect there: the rest runs
timeout "$(upto $t_tests)" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
passed='[0-9]+ passed'; [ "$mode" = smoke ] && passed='[0-9]+ (passed|skipped)'
grep -Eq "$passed" "$OUT/pytest_gpu.log" && ! grep -Eq "[0-9]+ failed" "$OUT/pytest_gpu.log" || status=1
if [ "$mode" != quick ]; then
  timeout "$(upto $(( budget - 90 )))" python3 benchmarks/bench_input_pipeline.py --device "$device" \
    --images "$([ "$mode" = smoke ] && echo 48 || echo 960)" --workers "$([ "$mode" = smoke ] && echo 2 || echo 8)" \
    --json "$OUT/input_pipeline.json" || status=1
  timeout "$(upto $(( budget - 5 )))" python3 benchmarks/bench_everything.py --device "$device" "${everything[@]}" \
    --json "$OUT/everything_$device.json" || status=1
fi
echo "device_check: $mode done in ${SECONDS} s of ${budget}, status $status"
exit $status
