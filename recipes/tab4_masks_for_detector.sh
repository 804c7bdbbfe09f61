#!/usr/bin/env bash
# Paper Tab. 4: keep the detector's labels and scores, add OVSAM masks; mask AP.
# usage: tab4_masks_for_detector.sh coco|lvis DETS.json [extra ovsam label options]
set -euo pipefail
source "$(dirname "$0")/_dataset.sh" "${1:-}"
dataset=$1; dets=${2:?detector results JSON}; shift 2
out="tab4_${dataset}_labeled.json"
ovsam label --model "$model" --label-source detector --boxes "$dets" --images "$images" --ann "$ann" \
  --out "$out" --resume "$@"
ovsam eval --dataset "$dataset" --ann "$ann" --pred "$out" --json "tab4_${dataset}.json"
