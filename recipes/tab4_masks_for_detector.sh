#!/usr/bin/env bash
# Paper Tab. 4: keep the detector's labels and scores, add OVSAM masks; mask AP.
# usage: tab4_masks_for_detector.sh coco|lvis DETS.json [extra ovsam label options]
set -euo pipefail
dataset=${1:?coco or lvis}; dets=${2:?detector results JSON}; shift 2
if [ "$dataset" = coco ]; then
  ann=${COCO:?set COCO}/annotations/instances_val2017.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-coco}
else
  ann=${LVIS:?set LVIS}/lvis_v1_val.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-lvis}
fi
out="tab4_${dataset}_labeled.json"
ovsam label --model "$model" --label-source detector --boxes "$dets" --images "${COCO:?set COCO}/val2017" \
  --ann "$ann" --out "$out" --resume "$@"
ovsam eval --dataset "$dataset" --ann "$ann" --pred "$out" --json "tab4_${dataset}.json"
