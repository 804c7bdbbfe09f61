#!/usr/bin/env bash
# Paper Tab. 1: one prompt (GT box or centre point) per GT instance; mIoU base/novel and accuracy.
# usage: tab1_prompt_protocol.sh coco|lvis box|point [extra ovsam eval options]
set -euo pipefail
source "$(dirname "$0")/_dataset.sh" "${1:-}"
dataset=$1; prompt=${2:?box or point}; shift 2
ovsam eval --protocol prompt --prompt "$prompt" --dataset "$dataset" --ann "$ann" --images "$images" \
  --model "${OVSAM_RECIPE_MODELS:-$model,baseline-image-crop,baseline-feature-crop}" --json "tab1_${dataset}_${prompt}.json" "$@"
