"""Labeling throughput: ovsam against both baselines and SAM alone, in one process, on the same
images and boxes (issue 8).

Rows, each timed over the same `--n-images` images and their detector boxes after one warm-up image
(a dataset with fewer images is taken again under new ids; SAM alone and the random-box rows time
the first `--few-images`), run most wanted first so that `--budget` cuts the least useful:
  ovsam                  `ovsam label`'s engine (`open_labeler(...).run`) with ovsam-rn50x16-lvis:
                         JPEG decoding, the model, RLE, the results JSON
  ovsam (plain path)     the same with every exact fast path off (`set_fast_path(model, False)`), with --plain
  ovsam, bf16 on CPU     the ovsam row under bf16 autocast on CPU (`--cpu-bf16` of `ovsam label`), with --cpu-bf16
  image-crop baseline    the same engine with `baseline-image-crop` (SAM ViT-H + CLIP on image crops)
  feature-crop baseline  the same engine with `baseline-feature-crop`
  SAM alone              segment-anything's `SamPredictor` (ViT-H): `set_image`, `predict_torch` on the
                         batched boxes (single mask), masks to RLE with pycocotools: masks without names
Every model has random weights (the speed does not depend on the values; nothing is downloaded);
the vocabulary is the dataset's categories with random unit text embeddings of the real shape.
On CUDA the engine runs under bf16 autocast as the CLI does (SAM alone in fp32, as shipped).

Reported per row: images/s, prompts/s, peak memory (host: VmHWM reset before the timed images;
GPU: max_memory_allocated), the ratio of ovsam's images/s to the row's, and the mean RLE length of
the warm-up image's masks (random weights give speckled masks, tens of kB each against a trained
model's hundreds of bytes, so RLE encoding and JSON weigh more here than in use). `--sweep` adds ovsam
rows for 1/10/100/300 random boxes per image and image batch sizes 1/2/4/8. The table is printed
and appended to benchmarks/RESULTS.md with the machine, commit and date (`--results ''`: not).

    python benchmarks/label_throughput.py                        # CPU, the 2 sample images (~25 min on 2 cores)
    python benchmarks/label_throughput.py --device cuda --boxes gt --images coco/val2017 --ann coco/instances.json \
        --n-images 480 --few-images 48 --batch-size 8 --workers 8 --plain --sweep   # as benchmarks/device_check.sh
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from bench_common import DATA, ROOT, machine, reset_peak_rss, status_mib, with_random_embeddings

SAMPLE = DATA / "coco-detections-sample"
OVSAM = "ovsam-rn50x16-lvis"


_BUILT: dict[tuple[str, bool], Any] = {}  # the predictor of the last engine row, by (model, cpu_bf16)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Peak:
    """Peak host RSS and GPU memory over a block (MiB)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.host_mib: Optional[float] = None
        self.gpu_mib: Optional[float] = None

    def __enter__(self) -> "Peak":
        import torch

        self.reset = reset_peak_rss()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        self.host_mib = status_mib("VmHWM") if self.reset else None
        if self.device.startswith("cuda"):
            self.gpu_mib = torch.cuda.max_memory_allocated() / 2**20


def _timed(device: str, run: Callable[[], int], images: int) -> dict[str, Any]:
    """Run once; images/s, prompts/s and peaks."""
    _sync(device)
    with Peak(device) as peak:
        t0 = time.perf_counter()
        prompts = run()
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"images": images, "prompts": prompts, "seconds": seconds, "images_per_s": images / seconds,
            "prompts_per_s": prompts / seconds, "host_peak_mib": peak.host_mib, "gpu_peak_mib": peak.gpu_mib}


def _dataset(gt: dict, image_ids: list[int]) -> Path:
    """A copy of the dataset `gt` with only `image_ids` (the engine labels every image of its dataset)."""
    keep = set(image_ids)
    subset = dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                  annotations=[a for a in gt.get("annotations", []) if a["image_id"] in keep])
    path = Path(tempfile.mkdtemp(prefix="ovsam-bench-")) / f"ann-{len(keep)}.json"
    path.write_text(json.dumps(subset))
    return path


def _rle_chars(results: Path) -> Optional[float]:
    """Mean length of the RLE strings of a results file: random weights make speckled masks whose
    RLEs run to tens of kB (a trained model's: hundreds of bytes), which inflates the CPU share of
    a row (encoding, JSON); the column says how much."""
    records = json.loads(results.read_text())
    return sum(len(r["segmentation"]["counts"]) for r in records) / len(records) if records else None


def repeated(gt: dict, records: list[dict], image_ids: list[int], n: int) -> tuple[dict, list[dict], list[int]]:
    """`n` images from `image_ids`, taken again under new ids (the same files, boxes and
    annotations) where there are fewer: a GPU labels a few dozen images in well under a second,
    too short a run to time."""
    if n <= len(image_ids):
        return gt, records, image_ids[:n]
    by_id = {im["id"]: im for im in gt["images"]}
    step = max(im["id"] for im in gt["images"]) + 1
    images, annotations, boxes, ids = list(gt["images"]), list(gt.get("annotations", [])), list(records), []
    for k in range(n):
        source = image_ids[k % len(image_ids)]
        copy = k // len(image_ids)
        if copy == 0:
            ids.append(source)
            continue
        new_id = source + copy * step
        ids.append(new_id)
        images.append(dict(by_id[source], id=new_id))
        annotations += [dict(a, image_id=new_id) for a in gt.get("annotations", []) if a["image_id"] == source]
        boxes += [dict(r, image_id=new_id) for r in records if r["image_id"] == source]
    return dict(gt, images=images, annotations=annotations), boxes, ids


def engine_row(name: str, model: str, args: argparse.Namespace, gt: dict, records: list[dict], image_ids: list[int],
               plain: bool = False, batch_size: Optional[int] = None, cpu_bf16: bool = False) -> dict[str, Any]:
    """One model through `ovsam label`'s engine: a warm-up image, then the timed images."""
    import torch

    from ovsam_model.labeling.api import ModelSettings, load_predictor, open_labeler
    from ovsam_model.modeling.fast_path import set_fast_path
    from ovsam_model.registry import resolve_spec
    from ovsam_model.vocab import vocabulary_from_categories

    settings = ModelSettings(model=model, random_weights=True, device=args.device,
                             amp=args.device.startswith("cuda"), box_batch=args.box_batch, cpu_bf16=cpu_bf16)
    key = (model, cpu_bf16)
    if key not in _BUILT:  # rows of one model share its predictor (a full-size build takes seconds)
        _BUILT.clear()
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        spec = resolve_spec(model)
        vocabulary = with_random_embeddings(vocabulary_from_categories(gt["categories"], name="bench"),
                                            spec.config.clip.embed_dim)
        torch.manual_seed(0)
        _BUILT[key] = load_predictor(settings, vocabulary)
    predictor = _BUILT[key]
    fast = {m: m.fast_path for m in predictor.model.modules() if hasattr(m, "fast_path")} if plain else {}
    switched = set_fast_path(predictor.model, False) if plain else 0  # only ovsam has a plain row
    out = Path(tempfile.mkdtemp(prefix="ovsam-bench-"))

    def run(ids: list[int], tag: str) -> Callable[[], int]:
        """The labeling run of `ids`, its inputs prepared (untimed): `ovsam label` from the parsing on."""
        keep = set(ids)
        boxes, ann = [r for r in records if r["image_id"] in keep], _dataset(gt, ids)
        return lambda: open_labeler(args.images, boxes=boxes, ann=ann, predictor=predictor, model=settings,
                                    batch_size=batch_size or args.batch_size, workers=args.workers,
                                    max_dets=args.max_dets).run(out / f"{tag}.json", "results").prompts

    run(image_ids[:1], "warmup")()
    row = _timed(args.device, run(image_ids, "timed"), len(image_ids))
    row["rle_chars_per_mask"] = _rle_chars(out / "warmup.json")
    row.update(name=name, model=model, fast_paths_off=switched,
               batch_size=batch_size or args.batch_size)
    for module, enabled in fast.items():
        module.fast_path = enabled
    return row


def sam_row(args: argparse.Namespace, records: list[dict], image_ids: list[int], files: dict[int, str]) -> dict:
    """segment-anything's SamPredictor (ViT-H) on the same boxes (one image at a time, as it
    works): masks at the image size → RLE."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from pycocotools import mask as mask_utils
    from segment_anything import SamPredictor, sam_model_registry

    _BUILT.clear()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    predictor = SamPredictor(sam_model_registry[args.sam](checkpoint=None).to(args.device).eval())

    by_image: dict[int, list] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r["bbox"])

    def run(ids: list[int]) -> int:
        prompts = 0
        for image_id in ids:
            image = np.asarray(ImageOps.exif_transpose(Image.open(Path(args.images) / files[image_id]).convert("RGB")))
            boxes = by_image.get(image_id, [])[: args.max_dets]
            with torch.inference_mode():
                predictor.set_image(image)
                xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32,
                                    device=args.device).reshape(-1, 4)
                for s in range(0, len(xyxy), args.box_batch):
                    chunk = predictor.transform.apply_boxes_torch(xyxy[s : s + args.box_batch], image.shape[:2])
                    masks, _, _ = predictor.predict_torch(None, None, boxes=chunk, multimask_output=False)
                    binary = masks[:, 0].cpu().numpy()
                    mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
            prompts += len(boxes)
        return prompts

    run(image_ids[:1])
    row = _timed(args.device, lambda: run(image_ids), len(image_ids))
    row.update(name=f"SAM alone ({args.sam}, masks only)", model=f"sam-{args.sam}", batch_size=1)
    del predictor
    gc.collect()
    return row


def random_boxes(files: dict[int, tuple[int, int]], per_image: int, seed: int = 0) -> list[dict]:
    """`per_image` random boxes (16 px to half the image) on each image, as detector records."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for image_id, (w, h) in files.items():
        xy = rng.uniform(0, [w * 0.8, h * 0.8], size=(per_image, 2))
        wh = np.minimum(rng.uniform(16, [w / 2, h / 2], size=(per_image, 2)), [w, h] - xy)
        for (x, y), (bw, bh) in zip(xy, wh):
            records.append({"image_id": image_id, "bbox": [float(x), float(y), float(bw), float(bh)], "score": 0.9,
                            "category_id": 1})
    return records


def table(rows: list[dict], reference: float) -> str:
    lines = ["| row | images/s | prompts/s | ovsam ÷ row | host peak MiB | GPU peak MiB | RLE chars/mask |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:,.0f}"  # noqa: E731
        lines.append(f"| {r['name']} | {r['images_per_s']:.4g} | {r['prompts_per_s']:.4g} | "
                     f"{reference / r['images_per_s']:.2f}× | {fmt(r['host_peak_mib'])} | {fmt(r['gpu_peak_mib'])} | "
                     f"{fmt(r.get('rle_chars_per_mask'))} |")
    return "\n".join(lines)


def planned_rows(args: argparse.Namespace, wanted: set[str], gt: dict, records: list[dict], image_ids: list[int],
                 files: dict[int, str]) -> list[tuple[str, Callable[[], dict]]]:
    """The rows to measure, most wanted first (so that a --budget or a time limit cuts the least
    useful ones): ovsam and the image-crop baseline (the issue's GPU ratio), 300 boxes per image at
    --batch-size (its GPU memory target), the plain path, the feature-crop baseline, SAM alone,
    bf16 on CPU, then the rest of the sweep. SAM alone and the random-box rows time the first
    --few-images images."""
    variant = f":{args.baseline_variant}" if args.baseline_variant else ""
    few = image_ids[: args.few_images] if args.few_images else image_ids
    keep = set(few)
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"] if im["id"] in keep}

    def engine(name: str, model: str, boxes: list[dict] = records, ids: list[int] = image_ids,
               **kw: Any) -> tuple[str, Callable[[], dict]]:
        return name, lambda: engine_row(name, model, args, gt, boxes, ids, **kw)

    def random(n: int) -> tuple[str, Callable[[], dict]]:
        return engine(f"ovsam, {n} random boxes/image", args.model, random_boxes(sizes, n), few)

    plan = []
    if "ovsam" in wanted:
        plan.append(engine("ovsam", args.model))
    if "image-crop" in wanted:
        plan.append(engine("image-crop baseline", "baseline-image-crop" + variant))
    if args.sweep:
        plan.append(random(300))
    if args.plain:
        plan.append(engine("ovsam, plain path", args.model, plain=True))
    if "feature-crop" in wanted:
        plan.append(engine("feature-crop baseline", "baseline-feature-crop" + variant))
    if "sam" in wanted:
        plan.append(("SAM alone", lambda: sam_row(args, records, few, files)))
    if args.cpu_bf16:
        if not args.device.startswith("cpu"):
            raise SystemExit("--cpu-bf16 needs --device cpu")
        plan.append(engine("ovsam, bf16 on CPU", args.model, cpu_bf16=True))
    if args.sweep:
        plan += [random(n) for n in (1, 10, 100)]
        plan += [engine(f"ovsam, image batch {b}", args.model, batch_size=b) for b in (1, 2, 4, 8)]
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SAMPLE / "images"), help="image folder")
    ap.add_argument("--ann", default=str(SAMPLE / "instances_val2017_subset_139_802.json"), help="COCO dataset JSON")
    ap.add_argument("--boxes", default=str(ROOT / "examples" / "detections_139_802.json"),
                    help="detector boxes, COCO results JSON; 'gt': the dataset's own annotation boxes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--n-images", type=int, default=2,
                    help="timed images (after one warm-up image); where the dataset has fewer, its images again")
    ap.add_argument("--few-images", type=int, default=0,
                    help="timed images of the slow rows, SAM alone and the random-box sweep (0: --n-images)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per model call")
    ap.add_argument("--box-batch", type=int, default=64, help="boxes per decoder call")
    ap.add_argument("--workers", type=int, default=2, help="JPEG-decoding workers")
    ap.add_argument("--max-dets", type=int, default=300, help="boxes kept per image")
    ap.add_argument("--model", default=OVSAM, help="the ovsam model (e.g. tiny, for a quick check of the script)")
    ap.add_argument("--baseline-variant", default="", help="baselines' ':variant' (vit_b, vit_l; tiny for a check)")
    ap.add_argument("--sam", default="vit_h", help="segment-anything model of the SAM row")
    ap.add_argument("--rows", default="ovsam,image-crop,feature-crop,sam",
                    help="comma list of ovsam, image-crop, feature-crop, sam")
    ap.add_argument("--plain", action="store_true", help="add an ovsam row with every exact fast path off")
    ap.add_argument("--cpu-bf16", action="store_true", help="add an ovsam row under bf16 autocast on CPU (--device cpu)")
    ap.add_argument("--sweep", action="store_true", help="add ovsam rows for 1/10/100/300 boxes and batch 1/2/4/8")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="append here ('' = don't)")
    ap.add_argument("--json", default=None, help="also write the rows here (rewritten after every row)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: start no row after this (the rows run most wanted first); 0 = no limit")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return
    gt = json.loads(Path(args.ann).read_text())
    if args.boxes == "gt":
        records = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
                   for a in gt["annotations"]]
    else:
        records = [r for r in json.loads(Path(args.boxes).read_text()) if "bbox" in r]
    with_boxes = sorted({r["image_id"] for r in records})
    image_ids = [im["id"] for im in gt["images"] if im["id"] in set(with_boxes)]
    if not image_ids:
        raise SystemExit(f"{args.boxes}: no box on an image of {args.ann}")
    gt, records, image_ids = repeated(gt, records, image_ids, args.n_images)
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    wanted = set(args.rows.split(","))
    rows: list[dict] = []
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.monotonic()
    facts = machine()

    def write_json() -> None:  # after every row, atomically: a run killed by a time limit keeps its rows
        if args.json:
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps({"machine": facts, "rows": rows}, indent=1))
            tmp.replace(args.json)

    plan = planned_rows(args, wanted, gt, records, image_ids, files)
    if not plan:
        raise SystemExit("no row chosen (--rows)")
    for i, (name, measure) in enumerate(plan):
        if args.budget and time.monotonic() - clock > args.budget:
            print(f"--budget {args.budget:g} s spent: not run: {'; '.join(n for n, _ in plan[i:])}", file=sys.stderr)
            break
        rows.append(measure())
        print(json.dumps(rows[-1]), flush=True)
        write_json()
    reference = next((r["images_per_s"] for r in rows if r["name"] == "ovsam"), rows[0]["images_per_s"])
    text = table(rows, reference)
    print(text)
    if args.results:
        boxes_per_image = len([r for r in records if r["image_id"] in set(image_ids)]) / max(len(set(image_ids)), 1)
        header = (f"\n## label_throughput, {started:%Y-%m-%d %H:%M} UTC, {args.device}\n\n"
                  f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib'] or 0:.0f} GiB"
                  f"{', ' + facts['gpu'] if facts['gpu'] else ''}; torch {facts['torch']} ({facts['threads']} threads); "
                  f"commit {facts['commit']}; load average {facts['load']:.1f}.\n"
                  f"Images: {len(image_ids)} timed from {args.images} (~{boxes_per_image:.1f} boxes each"
                  f"{f'; SAM alone and random boxes: the first {args.few_images}' if args.few_images else ''}), "
                  f"image batch {args.batch_size}, box batch {args.box_batch}, random weights"
                  f"{', bf16 autocast' if args.device.startswith('cuda') else ', fp32'}.\n"
                  f"Command: `python benchmarks/label_throughput.py {' '.join(sys.argv[1:])}`\n\n")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
