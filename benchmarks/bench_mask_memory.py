"""Peak RSS of the predictor's mask output: "bool" masks then `encode_rle` (the old writer path)
vs `mask_format="rle"` (masks encoded a few at a time, never N full-size masks at once).

Every case runs in a fresh child process that reports its own peak RSS (`ru_maxrss` of
`resource.getrusage`), so no case inherits another's high-water mark. The model is `tiny` with
random weights on CPU (memory does not depend on the values); the image is a real COCO photo
resized to the case's size (a seeded random image without the test data); the boxes are random
with a fixed seed. Targets: peak(rle, 5,000 boxes) ≤ 1.3 × peak(rle, 300 boxes) on 640×480, and
peak(rle, 300 boxes) ≤ 2 GB on 4000×3000.

    python benchmarks/bench_mask_memory.py            # all cases, both formats
    python benchmarks/bench_mask_memory.py --formats rle --cases 640x480:300 640x480:5000
    PYTHONPATH=/path/to/older/checkout python benchmarks/bench_mask_memory.py --formats bool  # before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CASES = ("640x480:300", "640x480:5000", "4000x3000:300")
FORMATS = ("bool", "rle")
TARGET_BOX_RATIO = 1.3
TARGET_LARGE_BYTES = 2e9


def _image(width: int, height: int, seed: int) -> np.ndarray:
    """HxWx3 uint8: the first COCO photo of the test data resized, else seeded noise."""
    from PIL import Image

    paths = sorted((DATA / "coco-val2017-mini" / "images").glob("*.jpg"))
    if paths:
        return np.array(Image.open(paths[0]).convert("RGB").resize((width, height), Image.BILINEAR))
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _boxes(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """[n, 4] XYXY random boxes of 5-50 % of each side, inside the image."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [width * 0.9, height * 0.9], size=(n, 2))
    wh = rng.uniform(0.05, 0.5, size=(n, 2)) * [width, height]
    return np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(case: str, mask_format: str, model: str, box_chunk: int, seed: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from ovsam_model.builder import build_predictor
    from ovsam_model.io.masks import encode_rle
    from ovsam_model.types import Prompts

    size, n = case.split(":")
    width, height = (int(v) for v in size.split("x"))
    torch.manual_seed(0)
    predictor = build_predictor(model, random_weights=True, device="cpu", box_chunk=box_chunk)
    prepared = [predictor.prepare(_image(width, height, seed))]
    prompts = [Prompts(boxes=_boxes(int(n), height, width, seed))]
    ready = _peak_mib()
    t0 = time.perf_counter()
    if mask_format == "rle":
        rles = predictor.predict_prepared(prepared, prompts, mask_format="rle")[0].rles
    else:  # the default call, so an older checkout on PYTHONPATH measures the code before "rle"
        rles = encode_rle(predictor.predict_prepared(prepared, prompts)[0].masks)
    seconds = time.perf_counter() - t0
    return {"case": case, "format": mask_format, "model": model, "box_chunk": box_chunk, "masks": len(rles),
            "rle_chars": sum(len(r["counts"]) for r in rles), "ready_peak_mib": round(ready, 1),
            "peak_mib": round(_peak_mib(), 1), "seconds": round(seconds, 1)}


def _run_child(case: str, mask_format: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", case, mask_format, "--model", args.model,
           "--box-chunk", str(args.box_chunk), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case} {mask_format} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(results: list[dict]) -> None:
    print("\n| case | format | masks | peak RSS MiB | RSS before predicting MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['format']} | {r['masks']} | {r['peak_mib']:,.0f} | {r['ready_peak_mib']:,.0f} "
              f"| {r['seconds']} |")
    peak = {(r["case"], r["format"]): r["peak_mib"] for r in results}
    print()
    for fmt in FORMATS:
        small, large = peak.get(("640x480:300", fmt)), peak.get(("640x480:5000", fmt))
        if small and large:
            ok = "meets" if large / small <= TARGET_BOX_RATIO else "misses"
            print(f"{fmt}: peak(5,000 boxes) / peak(300 boxes) = {large / small:.2f} "
                  f"({ok} the ≤ {TARGET_BOX_RATIO} target)")
        big = peak.get(("4000x3000:300", fmt))
        if big:
            ok = "meets" if big * 2**20 <= TARGET_LARGE_BYTES else "misses"
            print(f"{fmt}: 4000×3000 with 300 boxes peaks at {big * 2**20 / 1e9:.2f} GB "
                  f"({ok} the ≤ {TARGET_LARGE_BYTES / 1e9:.0f} GB target)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), help="WIDTHxHEIGHT:BOXES")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--box-chunk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "FORMAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.model, args.box_chunk, args.seed)))
        return
    results = []
    for case in args.cases:
        for mask_format in args.formats:
            results.append(_run_child(case, mask_format, args))
            print(json.dumps(results[-1]), flush=True)
    _summary(results)


if __name__ == "__main__":
    main()
