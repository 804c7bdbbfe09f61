#!/usr/bin/env bash
# Paper Tab. 1: one prompt (GT box or centre point) per GT instance; mIoU base/novel and accuracy.
# usage: tab1_prompt_protocol.sh coco|lvis box|point [extra ovsam eval options]
set -euo pipefail
dataset=${1:?coco or lvis}; prompt=${2:?box or point}; shift 2
if [ "$dataset" = coco ]; then
  ann=${COCO:?set COCO}/annotations/instances_val2017.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-coco}
else
  ann=${LVIS:?set LVIS}/lvis_v1_val.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-lvis}
fi
ovsam eval --protocol prompt --prompt "$prompt" --dataset "$dataset" --ann "$ann" --images "${COCO:?set COCO}/val2017" \
  --model "${OVSAM_RECIPE_MODELS:-$model,baseline-image-crop,baseline-feature-crop}" --json "tab1_${dataset}_${prompt}.json" "$@"
