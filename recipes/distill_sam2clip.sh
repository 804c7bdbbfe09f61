#!/usr/bin/env bash
# Paper §3.2 / spec §6: distill SAM ViT-H into the SAM2CLIP adapter on frozen CLIP RN50x16
# (AdamW 1e-4, wd 0.05, warm-up 500 then cosine, 24 epochs, global batch 16).
# usage: distill_sam2clip.sh IMAGES_DIR OUT_DIR [extra ovsam distill options]
#   NGPU=8 (default: 1) runs under torchrun, one process per GPU (batch 16 = 2 per GPU).
#   The SAM ViT-H teacher checkpoint is fetched, or give --checkpoint sam=sam_vit_h_4b8939.pth.
# Then: ovsam label --checkpoint sam2clip=OUT_DIR/sam2clip_distilled.pth ...
set -euo pipefail
images=${1:?images folder (e.g. 1% of SA-1B)}; out=${2:?output folder}; shift 2
args=(distill --images "$images" --out "$out" --model "${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-coco}"
      --epochs 24 --batch-size 16 --lr 1e-4 --weight-decay 0.05 --warmup-iters 500 "$@")
if [ "${NGPU:-1}" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node "$NGPU" -m ovsam_cli "${args[@]}"
fi
exec ovsam "${args[@]}"
