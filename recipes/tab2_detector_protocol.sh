#!/usr/bin/env bash
# Paper Tab. 2: detector boxes in, OVSAM masks and open-vocabulary labels out, mask AP.
# usage: tab2_detector_protocol.sh coco|lvis DETS.json [extra ovsam label options]
set -euo pipefail
source "$(dirname "$0")/_dataset.sh" "${1:-}"
dataset=$1; dets=${2:?detector results JSON}; shift 2
split=all; [ "$dataset" = coco ] && split=ov
out="tab2_${dataset}_labeled.json"
ovsam label --model "$model" --boxes "$dets" --images "$images" --ann "$ann" --out "$out" --resume "$@"
ovsam eval --dataset "$dataset" --ann "$ann" --pred "$out" --split "$split" --json "tab2_${dataset}.json"
