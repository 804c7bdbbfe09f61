#!/usr/bin/env bash
# Paper §3.3 / spec §6: finetune CLIP2SAM (FPN + mask/label/RoI head) on frozen CLIP RN50x16 +
# SAM2CLIP: COCO 48 base classes or LVIS frequent+common (AdamW 1e-4, wd 0.05, warm-up 500,
# ×0.1 at epochs 8 and 11 of 12, grad-clip 0.01, global batch 16, 40 prompts per image).
# usage: finetune_clip2sam.sh coco|lvis ANN_JSON IMAGES_DIR OUT_DIR [extra ovsam finetune options]
#   NGPU=8 (default: 1) runs under torchrun, one process per GPU (batch 16 = 2 per GPU).
#   The frozen adapter is the released sam2clip file (fetched), or --checkpoint sam2clip=PATH
#   (e.g. OUT/sam2clip_distilled.pth of distill_sam2clip.sh).
# Then: ovsam label --checkpoint clip2sam=OUT_DIR/clip2sam_finetuned.pth ...
set -euo pipefail
dataset=${1:?coco or lvis}; ann=${2:?instances JSON (train2017 / lvis_v1_train)}
images=${3:?images folder}; out=${4:?output folder}; shift 4
case "$dataset" in
  coco|lvis) ;;
  *) echo "error: dataset must be coco or lvis, not '$dataset'" >&2; exit 2 ;;
esac
args=(finetune --dataset "$dataset" --ann "$ann" --images "$images" --out "$out"
      --model "${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-$dataset}" --epochs 12 --batch-size 16 --lr 1e-4
      --weight-decay 0.05 --warmup-iters 500 --milestones 8,11 --grad-clip 0.01 --prompts-per-image 40 "$@")
if [ "${NGPU:-1}" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node "$NGPU" -m ovsam_cli "${args[@]}"
fi
exec ovsam "${args[@]}"
