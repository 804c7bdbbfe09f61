#!/usr/bin/env bash
# Paper Tab. 2: detector boxes in, OVSAM masks and open-vocabulary labels out, mask AP.
# usage: tab2_detector_protocol.sh coco|lvis DETS.json [extra ovsam label options]
set -euo pipefail
dataset=${1:?coco or lvis}; dets=${2:?detector results JSON}; shift 2
if [ "$dataset" = coco ]; then
  ann=${COCO:?set COCO}/annotations/instances_val2017.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-coco}; split=ov
else
  ann=${LVIS:?set LVIS}/lvis_v1_val.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-lvis}; split=all
fi
out="tab2_${dataset}_labeled.json"
ovsam label --model "$model" --boxes "$dets" --images "${COCO:?set COCO}/val2017" --ann "$ann" --out "$out" --resume "$@"
ovsam eval --dataset "$dataset" --ann "$ann" --pred "$out" --split "$split" --json "tab2_${dataset}.json"
