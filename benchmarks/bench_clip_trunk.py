"""Speed of ClipTrunk's exact fast paths (`fast_path=True`) against open_clip's modules (`False`).

Random weights of the real architecture (the speed does not depend on the values; BatchNorm
statistics and attention-pool biases are randomised so that the folding is not trivial). Prints one
JSON object per measurement: min of `--repeats` runs of each path, and the largest difference
relative to the output's largest magnitude.

    python benchmarks/bench_clip_trunk.py --model RN50x16 --rois 64 --chunks 5 --image-size 1024
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ovsam_model.config import TINY, ClipConfig
from ovsam_model.modeling.clip_trunk import ClipTrunk


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


def randomise(trunk: ClipTrunk) -> None:
    g = torch.Generator().manual_seed(0)
    sd = trunk.state_dict()
    for k, v in sd.items():
        if not v.is_floating_point() or not k.startswith("clip.visual."):
            continue
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith(("running_mean", "bias")) and (".bn" in k or "downsample.2" in k or "attnpool" in k):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    trunk.load_state_dict(sd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="RN50x16", help="open_clip ResNet name, or 'tiny'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rois", type=int, default=64, help="RoIs per region_embed call")
    ap.add_argument("--chunks", type=int, default=5, help="calls on the same image (the predictor's box chunks)")
    ap.add_argument("--grid", type=int, default=32, help="C5 side (1024 / 32)")
    ap.add_argument("--image-size", type=int, default=1024, help="trunk input side; 0 skips the trunk")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast")
    args = ap.parse_args()

    cfg = TINY.clip if args.model == "tiny" else ClipConfig(name=args.model, pretrained=None)
    trunk = ClipTrunk(cfg).to(args.device)
    randomise(trunk)
    pool = trunk.clip.visual.attnpool
    roi_size = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
    channels = pool.k_proj.in_features
    torch.manual_seed(0)
    ctx = (lambda: torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)) if args.autocast else None

    def run(fn):
        with torch.inference_mode():
            if ctx is None:
                return fn()
            with ctx():
                return fn()

    side = args.grid * 32
    c5 = torch.randn(1, channels, args.grid, args.grid, device=args.device).relu()
    xy = torch.rand(args.rois, 2) * side * 0.9
    wh = torch.rand(args.rois, 2) * side * 0.5 + 4
    rois = torch.cat([torch.zeros(args.rois, 1), xy, xy + wh], dim=1).to(args.device)

    def embed(fast: bool, calls: int):
        trunk.fast_path = fast
        trunk.clear_fast_cache()
        out = [trunk.region_embed(c5[0:1], rois, roi_size) for _ in range(calls)]
        return out[-1]

    for calls in (1, args.chunks):
        t_old, e_old = timed(lambda: run(lambda: embed(False, calls)), args.repeats)
        t_new, e_new = timed(lambda: run(lambda: embed(True, calls)), args.repeats)
        print(json.dumps({"what": "region_embed", "model": args.model, "rois": args.rois, "calls": calls,
                          "grid": args.grid, "old_s": round(t_old, 4), "new_s": round(t_new, 4),
                          "speedup": round(t_old / t_new, 2), "max_rel_diff": rel(e_old, e_new)}))

    if args.image_size:
        pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)

        def forward(fast: bool):
            trunk.fast_path = fast
            return trunk(pixels)

        run(lambda: forward(True))  # build the folded copy once (cached: it is not what is timed)
        t_old, f_old = timed(lambda: run(lambda: forward(False)), args.repeats)
        t_new, f_new = timed(lambda: run(lambda: forward(True)), args.repeats)
        # what returning NCHW-contiguous outputs costs inside new_s (the trunk runs in channels_last)
        last = [f.contiguous(memory_format=torch.channels_last) for f in f_new]
        t_copy, _ = timed(lambda: run(lambda: [f.contiguous() for f in last]), args.repeats)
        print(json.dumps({"what": "trunk_forward", "model": args.model, "batch": args.batch,
                          "image_size": args.image_size, "old_s": round(t_old, 4), "new_s": round(t_new, 4),
                          "speedup": round(t_old / t_new, 2), "contiguous_copy_s": round(t_copy, 4),
                          "max_rel_diff": [round(rel(a, b), 9) for a, b in zip(f_old, f_new)]}))


if __name__ == "__main__":
    main()
