"""End-to-end predictor throughput (images/s) on real images, bf16 autocast vs fp32.

The model has random weights (speed does not depend on the values). Both variants run in this
process on the same images and prompts; the ratio is the figure to report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovsam_model.builder import build_predictor
from ovsam_model.types import Prompts

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _images(n: int) -> list[np.ndarray]:
    paths = sorted((DATA / "coco-val2017-mini" / "images").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no images under {DATA}/coco-val2017-mini (set OVSAM_TEST_DATA)")
    return [np.array(Image.open(paths[i % len(paths)]).convert("RGB")) for i in range(n)]


def _boxes(image: np.ndarray, n: int, seed: int) -> Prompts:
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w * 0.8, h * 0.8], size=(n, 2))
    wh = rng.uniform(16, [w / 2, h / 2], size=(n, 2))
    return Prompts(boxes=np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="ovsam-rn50x16-coco")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--boxes", type=int, default=100, help="boxes per image")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--box-chunk", type=int, default=64)
    args = ap.parse_args()
    images = _images(args.images)
    prompts = [_boxes(im, args.boxes, i) for i, im in enumerate(images)]
    torch.manual_seed(0)
    predictor = build_predictor(args.model, random_weights=True, device=args.device, box_chunk=args.box_chunk)
    prepared = [predictor.prepare(im) for im in images]
    variants = [("fp32", False), ("bf16-autocast", True)] if args.device.startswith("cuda") else [("fp32", False)]
    results = {}
    for name, amp in variants:
        predictor.amp = amp
        predictor.predict_prepared(prepared[: args.batch_size], prompts[: args.batch_size])  # warm-up
        _sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for s in range(0, len(prepared), args.batch_size):
            predictor.predict_prepared(prepared[s : s + args.batch_size], prompts[s : s + args.batch_size])
        _sync(args.device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
        results[name] = len(prepared) / dt
        print(json.dumps({"model": args.model, "variant": name, "device": args.device, "images": len(prepared),
                          "boxes_per_image": args.boxes, "images_per_s": results[name], "peak_mib": peak}))
    if len(results) == 2:
        print(json.dumps({"bf16_speedup": results["bf16-autocast"] / results["fp32"]}))


if __name__ == "__main__":
    main()
