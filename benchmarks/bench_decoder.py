"""Decoder + mask post-processing for N boxes on one image: ours vs segment-anything's path.

Both use the same weights and the same full-size (256-d) decoder. Ours: chunks of --chunk
prompts, the image embedding broadcast (not repeated), one mask token, one interpolation from
the 256² logits to the original size, bool masks. Baseline: `MaskDecoder.forward` (which
repeat_interleaves the embedding per prompt and predicts 4 masks), then `Sam.postprocess_masks`
(1024² then the original size) for all N at once, as SamPredictor.predict_torch does.

`--paths`: instead, our decoder alone (`OneTokenMaskDecoder.predict`, no post-processing) with
`fast_path=True` vs `False` on the same N click (or box) prompts of one image, in one process,
each timed --repeats times after a warm-up (min reported), and the largest difference between
the two paths' logits relative to their std.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ovsam_model.modeling.decoder import OVSAMHead
from ovsam_model.transforms import masks_to_original_exact, masks_to_original_fast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak(device: torch.device, rss_before: float) -> float:
    """CUDA: peak allocated. CPU: peak resident set growth of this process (run one variant per
    process, see --variant, so the two do not share a high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--boxes", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", choices=["segment-anything", "ovsam"], default=None,
                    help="run one variant only (on CPU each variant runs in its own process for memory)")
    ap.add_argument("--paths", action="store_true", help="time fast_path=True vs False of our decoder")
    ap.add_argument("--prompt", choices=["clicks", "boxes"], default="clicks", help="with --paths")
    ap.add_argument("--prompts", type=int, default=64, help="with --paths: prompts in the batch")
    args = ap.parse_args()
    if args.paths:
        _compare_paths(args)
        return
    if args.variant is None and args.device == "cpu":
        _run_in_subprocesses(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16).to(device).eval()
    sam_dec = MaskDecoder(transformer_dim=256, num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    sam_dec = sam_dec.to(device).eval()
    head = OVSAMHead().to(device).eval()
    emb = torch.randn(1, 256, 64, 64, device=device)
    pe = prompt.get_dense_pe()
    xy = torch.rand(args.boxes, 2, device=device) * 800
    boxes = torch.cat([xy, xy + 32 + torch.rand(args.boxes, 2, device=device) * 200], dim=1)
    original = (args.height, args.width)
    input_size = (int(args.height * 1024 / max(original) + 0.5), int(args.width * 1024 / max(original) + 0.5))

    @torch.inference_mode()
    def ours() -> int:
        kept = 0
        for s in range(0, args.boxes, args.chunk):
            sparse, dense = prompt(points=None, boxes=boxes[s : s + args.chunk], masks=None)
            low, _ = head.decode(emb, pe, sparse, dense)
            kept += int((masks_to_original_fast(low, input_size, original)[:, 0] > 0).sum() > 0)
        return kept

    @torch.inference_mode()
    def baseline() -> int:
        sparse, dense = prompt(points=None, boxes=boxes, masks=None)
        low, _ = sam_dec(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                         dense_prompt_embeddings=dense, multimask_output=False)
        return int((masks_to_original_exact(low, input_size, original) > 0).sum() > 0)

    results = {}
    for name, fn in (("segment-anything", baseline), ("ovsam", ours)):
        if args.variant not in (None, name):
            continue
        rss_before = _rss_mib()
        fn()  # warm-up
        _sync(device)
        _peak_reset(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        _sync(device)
        results[name] = {"s_per_image": (time.perf_counter() - t0) / args.repeats,
                         "peak_mib": _peak(device, rss_before)}
        print(json.dumps({"variant": name, "device": str(device), "boxes": args.boxes, **results[name]}))
    if len(results) == 2:
        _summary(results["segment-anything"], results["ovsam"])


def _summary(sam: dict, ours: dict) -> None:
    print(json.dumps({"speedup": sam["s_per_image"] / ours["s_per_image"],
                      "memory_ratio": sam["peak_mib"] / ours["peak_mib"]}))


def _compare_paths(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16).to(device).eval()
    head = OVSAMHead().to(device).eval()
    dec = head.mask_decoder
    emb = torch.randn(1, 256, 64, 64, device=device)
    n = args.prompts
    with torch.inference_mode():
        pe = prompt.get_dense_pe()
        if args.prompt == "clicks":
            pts = torch.rand(n, 1, 2, device=device) * 1024
            sparse, dense = prompt(points=(pts, torch.ones(n, 1, device=device)), boxes=None, masks=None)
        else:
            xy = torch.rand(n, 2, device=device) * 800
            boxes = torch.cat([xy, xy + 32 + torch.rand(n, 2, device=device) * 200], dim=1)
            sparse, dense = prompt(points=None, boxes=boxes, masks=None)
        times, outs = {}, {}
        for fast in (False, True):
            dec.fast_path = fast
            outs[fast], _ = dec.predict(emb, pe, sparse, dense, head.label_token.weight)  # warm-up
            runs = []
            for _ in range(args.repeats):
                _sync(device)
                t0 = time.perf_counter()
                dec.predict(emb, pe, sparse, dense, head.label_token.weight)
                _sync(device)
                runs.append(time.perf_counter() - t0)
            times[fast] = min(runs)
            print(json.dumps({"fast_path": fast, "device": str(device), "threads": torch.get_num_threads(),
                              "prompt": args.prompt, "prompts": n, "s_min": times[fast],
                              "s_all": [round(r, 3) for r in runs]}))
        rel = ((outs[True] - outs[False]).abs().max() / outs[False].std()).item()
    print(json.dumps({"speedup": times[False] / times[True], "max_abs_diff_over_std": rel}))


def _run_in_subprocesses(args: argparse.Namespace) -> None:
    results = {}
    for name in ("segment-anything", "ovsam"):
        cmd = [sys.executable, __file__, "--variant", name, "--device", "cpu", "--boxes", str(args.boxes),
               "--chunk", str(args.chunk), "--height", str(args.height), "--width", str(args.width),
               "--repeats", str(args.repeats)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(line)
        results[name] = json.loads(line)
    _summary(results["segment-anything"], results["ovsam"])


if __name__ == "__main__":
    main()
