"""Labeling throughput: ovsam against both baselines and SAM alone, in one process, on the same
images and boxes (issue 8).

Rows, each timed over the same `--n-images` images and their detector boxes after one warm-up image:
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
GPU: max_memory_allocated), and the ratio of ovsam's images/s to the row's. `--sweep` adds ovsam
rows for 1/10/100/300 random boxes per image and image batch sizes 1/2/4/8. The table is printed
and appended to benchmarks/RESULTS.md with the machine, commit and date (`--results ''`: not).

    python benchmarks/label_throughput.py                        # CPU, the 2 sample images (~25 min on 2 cores)
    python benchmarks/label_throughput.py --device cuda --n-images 64 --plain --sweep
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
BASELINES = ("baseline-image-crop", "baseline-feature-crop")


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


def _dataset(ann: Path, image_ids: list[int]) -> Path:
    """A copy of `ann` with only `image_ids` (the engine labels every image of its dataset)."""
    gt = json.loads(ann.read_text())
    keep = set(image_ids)
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt.get("annotations", []) if a["image_id"] in keep]
    path = Path(tempfile.mkdtemp(prefix="ovsam-bench-")) / f"ann-{len(keep)}.json"
    path.write_text(json.dumps(gt))
    return path


def engine_row(name: str, model: str, args: argparse.Namespace, records: list[dict], image_ids: list[int],
               plain: bool = False, batch_size: Optional[int] = None, cpu_bf16: bool = False) -> dict[str, Any]:
    """One model through `ovsam label`'s engine: a warm-up image, then the timed images."""
    import torch

    from ovsam_model.labeling.api import ModelSettings, load_predictor, open_labeler
    from ovsam_model.modeling.fast_path import set_fast_path
    from ovsam_model.registry import resolve_spec
    from ovsam_model.vocab import vocabulary_from_categories

    spec = resolve_spec(model)
    categories = json.loads(Path(args.ann).read_text())["categories"]
    vocabulary = with_random_embeddings(vocabulary_from_categories(categories, name="bench"),
                                        spec.config.clip.embed_dim)
    torch.manual_seed(0)
    settings = ModelSettings(model=model, random_weights=True, device=args.device,
                             amp=args.device.startswith("cuda"), box_batch=args.box_batch, cpu_bf16=cpu_bf16)
    predictor = load_predictor(settings, vocabulary)
    switched = set_fast_path(predictor.model, False) if plain else 0  # only ovsam has a plain row
    out = Path(tempfile.mkdtemp(prefix="ovsam-bench-"))

    def run(ids: list[int], tag: str) -> int:
        labeler = open_labeler(args.images, boxes=[r for r in records if r["image_id"] in set(ids)],
                               ann=_dataset(Path(args.ann), ids), predictor=predictor, model=settings,
                               batch_size=batch_size or args.batch_size, workers=args.workers,
                               max_dets=args.max_dets)
        return labeler.run(out / f"{tag}.json", "results").prompts

    run(image_ids[:1], "warmup")
    row = _timed(args.device, lambda: run(image_ids, "timed"), len(image_ids))
    row.update(name=name, model=model, fast_paths_off=switched,
               batch_size=batch_size or args.batch_size)
    del predictor
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def sam_row(args: argparse.Namespace, records: list[dict], image_ids: list[int], files: dict[int, str]) -> dict:
    """segment-anything's SamPredictor (ViT-H) on the same boxes: masks at the image size → RLE."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from pycocotools import mask as mask_utils
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    predictor = SamPredictor(sam_model_registry[args.sam](checkpoint=None).to(args.device).eval())

    def run(ids: list[int]) -> int:
        prompts = 0
        for image_id in ids:
            image = np.asarray(ImageOps.exif_transpose(Image.open(Path(args.images) / files[image_id]).convert("RGB")))
            boxes = [r["bbox"] for r in records if r["image_id"] == image_id][: args.max_dets]
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
    lines = ["| row | images/s | prompts/s | ovsam ÷ row | host peak MiB | GPU peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:,.0f}"  # noqa: E731
        lines.append(f"| {r['name']} | {r['images_per_s']:.4g} | {r['prompts_per_s']:.4g} | "
                     f"{reference / r['images_per_s']:.2f}× | {fmt(r['host_peak_mib'])} | {fmt(r['gpu_peak_mib'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SAMPLE / "images"), help="image folder")
    ap.add_argument("--ann", default=str(SAMPLE / "instances_val2017_subset_139_802.json"), help="COCO dataset JSON")
    ap.add_argument("--boxes", default=str(ROOT / "examples" / "detections_139_802.json"),
                    help="detector boxes, COCO results JSON; 'gt': the dataset's own annotation boxes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--n-images", type=int, default=2, help="timed images (after one warm-up image)")
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
    ap.add_argument("--json", default=None, help="also write the rows here")
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
    image_ids = (image_ids * args.n_images)[: args.n_images] if len(image_ids) < args.n_images \
        else image_ids[: args.n_images]
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    wanted = set(args.rows.split(","))
    rows: list[dict] = []
    started = dt.datetime.now(dt.timezone.utc)

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "ovsam" in wanted:
        add(engine_row("ovsam", args.model, args, records, image_ids))
    if args.plain:
        add(engine_row("ovsam, plain path", args.model, args, records, image_ids, plain=True))
    if args.cpu_bf16:
        if not args.device.startswith("cpu"):
            raise SystemExit("--cpu-bf16 needs --device cpu")
        add(engine_row("ovsam, bf16 on CPU", args.model, args, records, image_ids, cpu_bf16=True))
    for model in BASELINES:
        if model.removeprefix("baseline-") in wanted:
            variant = f":{args.baseline_variant}" if args.baseline_variant else ""
            add(engine_row(model.removeprefix("baseline-") + " baseline", model + variant, args, records, image_ids))
    if "sam" in wanted:
        add(sam_row(args, records, image_ids, files))
    if args.sweep:
        sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"] if im["id"] in set(image_ids)}
        for n in (1, 10, 100, 300):
            add(engine_row(f"ovsam, {n} random boxes/image", args.model, args, random_boxes(sizes, n), image_ids))
        for b in (1, 2, 4, 8):
            add(engine_row(f"ovsam, image batch {b}", args.model, args, records, image_ids, batch_size=b))
    if not rows:
        raise SystemExit("no row chosen (--rows)")
    reference = next((r["images_per_s"] for r in rows if r["name"] == "ovsam"), rows[0]["images_per_s"])
    facts = machine()
    text = table(rows, reference)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "rows": rows}, indent=1))
    if args.results:
        boxes_per_image = len([r for r in records if r["image_id"] in set(image_ids)]) / max(len(set(image_ids)), 1)
        header = (f"\n## label_throughput, {started:%Y-%m-%d %H:%M} UTC, {args.device}\n\n"
                  f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib'] or 0:.0f} GiB"
                  f"{', ' + facts['gpu'] if facts['gpu'] else ''}; torch {facts['torch']} ({facts['threads']} threads); "
                  f"commit {facts['commit']}; load average {facts['load']:.1f}.\n"
                  f"Images: {len(image_ids)} timed from {args.images} (~{boxes_per_image:.1f} boxes each), "
                  f"image batch {args.batch_size}, box batch {args.box_batch}, random weights"
                  f"{', bf16 autocast' if args.device.startswith('cuda') else ', fp32'}.\n"
                  f"Command: `python benchmarks/label_throughput.py {' '.join(sys.argv[1:])}`\n\n")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
