#!/usr/bin/env bash
# A small CLIP2SAM finetuning that runs on a CPU in a few minutes (tiny-256, 400 iterations, real
# images and annotations, COCO base classes), with the prompt protocol on held-out images every
# 100 iterations (tests/test_learning.py runs this script). Labels learn at once (top-1 accuracy
# from 0); the decoder, from random weights, first collapses to empty masks, then its held-out
# IoU climbs past the step-0 value (about 0.04 → 0.09). The milestones lie beyond the run: the
# lr stays constant after the warm-up. Longer (about 15 minutes): add --epochs 400 --max-iters 3000
# --resize-min 1 --resize-max 1, and box-prompt IoU on the training images' base-class instances
# passes 0.6 (then `ovsam eval --protocol prompt --ann OUT/split/train.json ...` on the saved file).
# usage: tiny_finetune.sh IMAGES ANN OUT [extra ovsam finetune options]
#   IMAGES, ANN: COCO images and instances JSON (e.g. COCO val2017, or
#   shared/data/coco-val2017-mini); the last quarter of the image ids is held out, and only
#   instances of at least 64² px are kept (smaller ones are a few pixels at 256²).
set -euo pipefail
images=${1:?images folder}; ann=${2:?instances JSON}; out=${3:?output folder}; shift 3
here=$(cd "$(dirname "$0")" && pwd)
python "$here/split_heldout.py" "$ann" "$images" "$out/split" >&2
python -m ovsam_cli finetune --model tiny-256 --dataset coco \
  --ann "$out/split/train.json" --images "$images" --val-ann "$out/split/heldout.json" --out "$out" \
  --epochs 60 --max-iters 400 --batch-size 4 --prompts-per-image 16 --lr 1e-3 --warmup-iters 10 --milestones 1000 \
  --grad-clip 1.0 --resize-min 0.9 --resize-max 1.1 --eval-every 100 --workers 0 --plot "$@"
echo "metrics: $out/metrics.jsonl  curves: $out/curves.png  (ovsam plot $out)" >&2
