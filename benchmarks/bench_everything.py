"""Segment everything: OVSAM's `EverythingGenerator` (masks *and* names) vs segment-anything's
`SamAutomaticMaskGenerator` (ViT-H, masks only), same points per side / per batch / crops.

Both sides have random weights (the speed does not depend on the values; nothing is downloaded).
With random weights the two models' quality filters keep different numbers of masks, which
changes the post-processing cost, so by default every filter is off on both sides and every
mask of the grid goes through the whole pipeline (crop-edge filter, NMS, RLE):
  SAM   pred_iou_thresh=0, stability_score_thresh=0, output_mode="coco_rle"
  OVSAM stability_score_thresh=0, drop_background=False, min_label_prob=0, max_masks=0
`--filters default` (or `both`) adds the rows with each side's default thresholds.

Each side runs in a fresh child process: one warm-up image, then `--images` timed images (the
same real COCO images for both). Reported: wall seconds per image, images/s, CPU seconds per
image (less sensitive to other jobs on a shared machine), peak memory (CUDA:
`torch.cuda.max_memory_allocated` over the timed images, weights included; CPU: the child's peak
RSS over the timed images, VmHWM reset after the warm-up, weights included), masks per image,
and where the time goes (encoder / decoder / upsampling to image size / classification /
stability + boxes / RLE / NMS / the rest), timed around those calls.

    python benchmarks/bench_everything.py --device cpu       # 1 image after a small warm-up (~35 min, 2 cores)
    python benchmarks/bench_everything.py --device cuda --images 8 --filters both --fp32-row
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench_common import DATA, reset_peak_rss, status_mib, with_random_embeddings

PHASES = ("encode", "decode", "upsample", "classify", "stability+box", "rle", "nms", "other")
TARGET = 2.5


# --- timing of the phases --------------------------------------------------------------------

class PhaseTimer:
    """Seconds spent inside wrapped callables, by phase, exclusive of the wrapped calls nested in
    them (CUDA synchronized around each call)."""

    def __init__(self, device: str) -> None:
        import torch

        cuda = device.startswith("cuda")
        self.sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # per open call: the time of the wrapped calls nested in it

    def _enter(self) -> float:
        self.sync()
        self.stack.append(0.0)
        return time.perf_counter()

    def _leave(self, phase: str, started: float) -> None:
        self.sync()
        elapsed = time.perf_counter() - started
        self.totals[phase] += elapsed - self.stack.pop()
        if self.stack:
            self.stack[-1] += elapsed

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started = self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave(phase, started)

        setattr(owner, name, timed)

    def wrap_iter(self, owner, name: str, phase: str) -> None:
        """A generator function: time each step of the iterators it returns."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            it = fn(*args, **kwargs)
            while True:
                started = self._enter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self._leave(phase, started)
                yield item

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


# --- the two sides (child process) -----------------------------------------------------------

def _image_paths(n: int) -> list[Path]:
    paths = sorted((DATA / "coco-val2017-mini" / "images").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no images under {DATA}/coco-val2017-mini/images (set OVSAM_TEST_DATA)")
    return [paths[i % len(paths)] for i in range(n + 1)]  # [0]: the warm-up image


def _sam_side(case: dict, timer: PhaseTimer):
    import torch
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    import segment_anything.automatic_mask_generator as amg_module

    torch.manual_seed(0)
    sam = sam_model_registry[case["sam"]](checkpoint=None).to(case["device"]).eval()
    filters_off = case["filters"] == "off"

    def generator(points_per_side: int) -> SamAutomaticMaskGenerator:
        return SamAutomaticMaskGenerator(
            sam, points_per_side=points_per_side, points_per_batch=case["points_per_batch"],
            pred_iou_thresh=0.0 if filters_off else 0.88, stability_score_thresh=0.0 if filters_off else 0.95,
            crop_n_layers=case["crop_n_layers"], output_mode="coco_rle")  # box/crop NMS 0.7, overlap: defaults

    timed, warm = generator(case["points_per_side"]), generator(case["warmup_points_per_side"])
    timer.wrap(timed.predictor, "set_image", "encode")
    timer.wrap(timed.predictor, "predict_torch", "decode")
    timer.wrap(sam, "postprocess_masks", "upsample")  # inside predict_torch
    for name in ("calculate_stability_score", "batched_mask_to_box"):
        timer.wrap(amg_module, name, "stability+box")
    for name in ("mask_to_rle_pytorch", "coco_encode_rle"):
        timer.wrap(amg_module, name, "rle")
    timer.wrap(amg_module, "batched_nms", "nms")
    return timed.generate, warm.generate


def _ovsam_side(case: dict, timer: PhaseTimer):
    import ovsam_model.everything.generator as gen_module
    from ovsam_model.everything import EverythingGenerator, EverythingSettings
    from ovsam_model.labeling.api import ModelSettings, load_predictor

    settings = ModelSettings(model=case["model"], random_weights=True, device=case["device"], amp=case["amp"],
                             cpu_bf16=case.get("cpu_bf16", False))
    vocabulary = None
    if not case["encode_vocab"]:
        from ovsam_model.registry import resolve_spec
        from ovsam_model.vocab import load_vocabulary

        spec = resolve_spec(case["model"])
        vocabulary = with_random_embeddings(load_vocabulary(spec.vocabulary), spec.config.clip.embed_dim)
    predictor = load_predictor(settings, vocabulary)
    filters_off = case["filters"] == "off"
    extra = dict(stability_score_thresh=0.0, drop_background=False, min_label_prob=0.0, max_masks=0) \
        if filters_off else {}

    def generator(points_per_side: int) -> EverythingGenerator:
        return EverythingGenerator(predictor, EverythingSettings(
            points_per_side=points_per_side, points_per_batch=case["points_per_batch"],
            crop_n_layers=case["crop_n_layers"], **extra))

    timed, warm = generator(case["points_per_side"]), generator(case["warmup_points_per_side"])
    timer.wrap(predictor, "prepare", "encode")
    timer.wrap(predictor, "encode", "encode")
    timer.wrap(predictor, "decode_masks", "decode")
    timer.wrap(predictor, "classify", "classify")
    timer.wrap_iter(gen_module, "iter_mask_logits", "upsample")
    for name in ("calculate_stability_score", "batched_mask_to_box"):
        timer.wrap(gen_module, name, "stability+box")
    timer.wrap(gen_module, "encode_rle", "rle")
    timer.wrap(gen_module, "batched_nms", "nms")
    return timed.generate, warm.generate


def child(case: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    dev = case["device"]
    cuda = dev.startswith("cuda")
    timer = PhaseTimer(dev)
    run, warm_up = (_sam_side if case["side"] == "sam" else _ovsam_side)(case, timer)
    images = [np.array(Image.open(p).convert("RGB")) for p in _image_paths(case["images"])]
    warm_up(images[0])  # cuDNN autotune, allocator, lazy imports: every step of the pipeline once
    timer.take()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base_mib = torch.cuda.memory_allocated(dev) / 2**20 if cuda else status_mib("VmRSS")
    reset = cuda or reset_peak_rss()
    seconds, cpu_seconds, masks, phases = [], [], [], defaultdict(float)
    for image in images[1:]:
        c0, t0 = time.process_time(), time.perf_counter()
        out = run(image)
        if cuda:
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        masks.append(len(out))
        for k, v in timer.take().items():
            phases[k] += v
    peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else status_mib("VmHWM")
    n = len(seconds)
    per_phase = {k: phases.get(k, 0.0) / n for k in PHASES if k != "other"}
    per_phase["other"] = sum(seconds) / n - sum(per_phase.values())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "masks": masks, "peak_mib": peak_mib,
            "base_mib": base_mib, "peak_reset": reset, "phases": per_phase,
            "threads": torch.get_num_threads(), "sizes": [list(im.shape[:2]) for im in images[1:]]}


def run_child(case: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {case['name']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- parent ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--images", type=int, help="timed images, after one warm-up image (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--warmup-points-per-side", type=int,
                    help="the warm-up image's grid (default: on CUDA the timed grid; on CPU the smallest grid "
                         "that fills one --points-per-batch, which runs every step at a fraction of the cost)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--model", default="ovsam-rn50x16-lvis")
    ap.add_argument("--sam", default="vit_h", help="segment-anything variant of the baseline")
    ap.add_argument("--filters", choices=("off", "default", "both"), default="off",
                    help="off: every quality filter off on both sides (the fair comparison); default: each "
                         "side's default thresholds; both: the two")
    ap.add_argument("--cpu-bf16", action="store_true", help="add an OVSAM row under bf16 autocast on CPU "
                    "(`ovsam label --cpu-bf16`)")
    ap.add_argument("--no-amp", action="store_true", help="OVSAM in float32 on CUDA too (default: bf16 autocast, "
                                                          "as the CLI; SAM's generator runs in float32)")
    ap.add_argument("--fp32-row", action="store_true", help="on CUDA, also an OVSAM row in float32")
    ap.add_argument("--encode-vocab", action="store_true",
                    help="embed the vocabulary with the (random) text tower as the CLI does, instead of random "
                         "unit embeddings of the same shape (minutes on CPU; not timed either way)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(child(case)))
        return

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine; nothing measured.")
        return
    if args.images is None:
        args.images = 8 if cuda else 1
    if args.warmup_points_per_side is None:
        args.warmup_points_per_side = args.points_per_side if cuda else \
            min(args.points_per_side, math.ceil(math.sqrt(args.points_per_batch)))
    common = dict(device=args.device, images=args.images, points_per_side=args.points_per_side,
                  points_per_batch=args.points_per_batch, crop_n_layers=args.crop_n_layers, model=args.model,
                  sam=args.sam, encode_vocab=args.encode_vocab, warmup_points_per_side=args.warmup_points_per_side)
    filters = ["off", "default"] if args.filters == "both" else [args.filters]
    cases = []
    for f in filters:
        cases.append(dict(common, side="sam", filters=f, amp=False, name=f"SAM {args.sam} (filters {f})"))
        amp = cuda and not args.no_amp
        cases.append(dict(common, side="ovsam", filters=f, amp=amp,
                          name=f"OVSAM {args.model}{' bf16' if amp else ''} (filters {f})"))
        if not cuda and args.cpu_bf16:
            cases.append(dict(common, side="ovsam", filters=f, amp=False, cpu_bf16=True,
                              name=f"OVSAM {args.model} bf16 on CPU (filters {f})"))
        if cuda and amp and args.fp32_row:
            cases.append(dict(common, side="ovsam", filters=f, amp=False, name=f"OVSAM {args.model} fp32 (filters {f})"))
    print(f"device {args.device}, {args.images} timed images + 1 warm-up image ({args.warmup_points_per_side}² "
          f"points), points_per_side {args.points_per_side}, "
          f"points_per_batch {args.points_per_batch}, crop_n_layers {args.crop_n_layers}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for case in cases:
        started = time.monotonic()
        r = run_child(case)
        r.update(name=case["name"], side=case["side"], filters=case["filters"], amp=case["amp"],
                 child_wall_s=round(time.monotonic() - started, 1), load_after=round(os.getloadavg()[0], 1))
        results.append(r)
        print(json.dumps(r), flush=True)

    mem = "peak alloc MiB" if cuda else "peak RSS MiB"
    print(f"\n{'side':44} {'s/image':>8} {'images/s':>9} {'CPU s/img':>9} {mem:>14} {'masks/img':>9} {'vs SAM':>7}")
    for f in filters:
        sam = next(r for r in results if r["side"] == "sam" and r["filters"] == f)
        for r in (r for r in results if r["filters"] == f):
            s = sum(r["seconds"]) / len(r["seconds"])
            c = sum(r["cpu_seconds"]) / len(r["cpu_seconds"])
            ratio = sum(sam["seconds"]) / sum(r["seconds"])
            print(f"{r['name']:44} {s:>8.2f} {1 / s:>9.4g} {c:>9.1f} {r['peak_mib']:>14.0f} "
                  f"{sum(r['masks']) / len(r['masks']):>9.0f} {ratio:>6.2f}x")
    print(f"\nseconds per image by phase:\n{'side':44} " + " ".join(f"{p:>13}" for p in PHASES))
    for r in results:
        print(f"{r['name']:44} " + " ".join(f"{r['phases'].get(p, 0.0):>13.2f}" for p in PHASES))
    for f in filters:
        sam = next(r for r in results if r["side"] == "sam" and r["filters"] == f)
        ours = next(r for r in results if r["side"] == "ovsam" and r["filters"] == f)
        ratio = sum(sam["seconds"]) / sum(ours["seconds"])
        cpu_ratio = sum(sam["cpu_seconds"]) / sum(ours["cpu_seconds"])
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"\nfilters {f}: OVSAM {ratio:.2f}x SAM's images/s (CPU-time ratio {cpu_ratio:.2f}x); "
              f"target ≥ {TARGET}x: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
