#!/usr/bin/env bash
# The GPU check in one command, for a lent CUDA machine that has torch but no network and none of
# this project's other dependencies. Prepare on a CPU machine first: bash benchmarks/fetch_wheels.sh
# (it fills the git-ignored .device/ with wheels and the test data); carry .device; then run
#   bash benchmarks/device_check.sh [quick|full]
# from the repository root. Everything goes to $OUT (default ./device-out):
#   pytest_gpu.log                      pytest -m gpu (the CUDA tests)
#   label_throughput.json / RESULTS.md  ovsam vs the baselines and SAM alone, fast vs plain path, the sweep
#   everything_cuda.json                --everything vs SamAutomaticMaskGenerator (full only)
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-full}"
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
python3 -c "import torch; assert torch.cuda.is_available()" || { echo "device_check: no CUDA device" >&2; exit 2; }
status=0
# modules needing the test-only extras (ray, moto, label-studio-sdk) fail to collect here: the rest runs
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
grep -Eq "[0-9]+ passed" "$OUT/pytest_gpu.log" && ! grep -Eq "[0-9]+ failed" "$OUT/pytest_gpu.log" || status=1
data=.device/data/coco-val2017-mini
if [ "$mode" = quick ]; then
  timeout 300 python3 benchmarks/label_throughput.py --device cuda --images "$data/images" --ann "$data/instances.json" \
    --boxes gt --n-images 48 --batch-size 8 --plain --rows ovsam,image-crop \
    --json "$OUT/label_throughput.json" --results "$OUT/RESULTS.md" || status=1
else
  timeout 420 python3 benchmarks/label_throughput.py --device cuda --images "$data/images" --ann "$data/instances.json" \
    --boxes gt --n-images 48 --batch-size 8 --plain --sweep \
    --json "$OUT/label_throughput.json" --results "$OUT/RESULTS.md" || status=1
  OVSAM_TEST_DATA="$PWD/.device/data" timeout 300 python3 benchmarks/bench_everything.py --device cuda --images 4 \
    --json "$OUT/everything_cuda.json" || status=1
fi
exit $status
