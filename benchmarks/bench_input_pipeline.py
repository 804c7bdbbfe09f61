"""The labeling input pipeline alone (no model): JPEG decoding and preparation in DataLoader
workers, the batch to the model's device, as `ovsam label` runs it.

Two forms of what the workers ship, in one process, on the same images:
  float  `prepare_image`: [3, 1024, 1024] float32, normalised and padded in the worker (12 MiB);
         the main process stacks the batch and copies it to the device (as before 2026-12-06)
  uint8  `resize_image`: [3, h, w] uint8, resized only (≤ 3 MiB); `model_input` pads the batch
         as bytes, copies it (pinned, on CUDA) and normalises it on the device (what `prepare` does now)
Reported: images/s of the whole pipeline, bytes shipped per image, main-process CPU seconds per
image (what a GPU run waits on when the workers keep up), and that both give the same input.

    python benchmarks/bench_input_pipeline.py --device cpu --images 96 --workers 2
    python benchmarks/bench_input_pipeline.py --device cuda --images 960 --workers 8
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

from bench_common import DATA, machine


def run(form: str, images: list[dict], args: argparse.Namespace) -> dict:
    import torch

    from ovsam_model.config import PIXEL_MEAN, PIXEL_STD
    from ovsam_model.io.datasets import ImageRecord
    from ovsam_model.io.loader import make_loader
    from ovsam_model.transforms import model_input, prepare_image, resize_image

    prepare = partial(resize_image, size=1024) if form == "uint8" else partial(prepare_image, size=1024)
    folder = DATA / "coco-val2017-mini" / "images"
    records = [ImageRecord(id=i, path=folder / im["file_name"], file_name=im["file_name"], height=im["height"],
                           width=im["width"]) for i, im in enumerate(images)]
    device = torch.device(args.device)
    shipped, checksum = 0, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for batch in make_loader(records, prepare, batch_size=args.batch_size, workers=args.workers, exif="ignore"):
        prepared = [item.prepared for item in batch]
        shipped += sum(p.pixels.numel() * p.pixels.element_size() for p in prepared)
        if form == "uint8":
            x = model_input(prepared, 1024, PIXEL_MEAN, PIXEL_STD, device)
        else:
            x = torch.stack([p.pixels for p in prepared]).to(device, non_blocking=True)
        checksum += float(x[:, :, ::97, ::89].double().sum())  # a sparse read: the input is really there
    sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = len(images)
    return {"form": form, "images": n, "images_per_s": n / seconds, "mib_per_image": shipped / n / 2**20,
            "main_cpu_ms_per_image": 1000 * cpu / n, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=96, help="images (coco-val2017-mini's, again as needed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each form, alternating; the best is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    listed = json.loads((DATA / "coco-val2017-mini" / "instances.json").read_text())["images"]
    images = [listed[i % len(listed)] for i in range(args.images)]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for form in ("float", "uint8"):
            row = run(form, images, args)
            print(json.dumps(row), flush=True)
            if form not in best or row["images_per_s"] > best[form]["images_per_s"]:
                best[form] = row
    same = abs(best["float"]["checksum"] - best["uint8"]["checksum"]) <= 1e-6 * abs(best["float"]["checksum"])
    print(f"\n{'form':6} {'images/s':>9} {'MiB/image':>10} {'main CPU ms/image':>18}")
    for form, r in best.items():
        print(f"{form:6} {r['images_per_s']:>9.1f} {r['mib_per_image']:>10.2f} {r['main_cpu_ms_per_image']:>18.2f}")
    print(f"uint8 ÷ float: {best['uint8']['images_per_s'] / best['float']['images_per_s']:.2f}× images/s, "
          f"{best['float']['mib_per_image'] / best['uint8']['mib_per_image']:.1f}× fewer bytes; same input: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "best": best, "same_input": same}, f, indent=1)


if __name__ == "__main__":
    main()
