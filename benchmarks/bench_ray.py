"""Throughput of `ovsam label --ray` (the engine on Ray Data) against a run without Ray, `tiny`
model on CPU, the same images and detections, in one process and one session:

  plain        the engine without Ray (`open_labeler(...).run`), torch's default threads, one
               DataLoader worker
  plain-1t     the same on one torch thread (what one actor of one CPU runs)
  ray-1        Ray Data, one CPU actor (1 CPU, 1 thread), decoding in CPU tasks
  ray-2        two CPU actors (0.5 CPU each as Ray counts, 1 thread each) on the same CPUs

For each: the wall time, the time to the first finished block (start-up: model build, Ray's
planning and actor start) and the steady throughput (images/s between the first and the last
block). Ray's overhead per image is ray-1's steady seconds per image minus plain-1t's (the same
single thread doing the same work); it is also measured directly, less exposed to the load: the
time of the actors' calls, of pickling the decoded images and of the driver's reading of the
blocks, less the engine's own work in the actors (`RayLabeler.seconds`). The Ray outputs are
checked byte for byte against plain-1t, and plain-1t runs again at the end: its ratio to the
first says how much the load moved.

    python benchmarks/bench_ray.py                     # 24 images, batch 2
    python benchmarks/bench_ray.py --images 8 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OVSAM_TEST_DATA", REPO.parent / "shared" / "data"))


def detections(n_images: int, per_image: int) -> tuple[Path, Path, list[dict]]:
    root = DATA / "coco-val2017-mini"
    gt = json.loads((root / "instances.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])[:n_images]
    boxes: list[dict] = []
    for image_id in ids:
        mine = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]][:per_image]
        boxes += [{"image_id": image_id, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                  for a in mine]
    return root / "images", root / "instances.json", boxes


def timed(name: str, out: Path, **kwargs) -> dict:
    """One run; the times of its blocks come from the engine's events, Ray's own costs per image
    from the `RayLabeler`'s `seconds`."""
    from ovsam_model import open_labeler
    from ovsam_model.labeling.engine import LabelEvents

    class Clock(LabelEvents):
        def __init__(self) -> None:
            self.blocks: list[tuple[float, int]] = []

        def batch_done(self, images: int, prompts: int) -> None:
            self.blocks.append((time.perf_counter(), images))

    clock = Clock()
    started = time.perf_counter()
    labeler = open_labeler(events=clock, **kwargs)
    summary = labeler.run(out)
    wall = time.perf_counter() - started
    (first, _), (last, _) = clock.blocks[0], clock.blocks[-1]
    after_first = sum(n for _, n in clock.blocks[1:])
    steady = after_first / (last - first) if last > first else float("nan")
    row = {"run": name, "images": summary.images, "records": summary.records, "wall_s": round(wall, 2),
           "first_block_s": round(first - started, 2), "steady_images_per_s": round(steady, 3),
           "images_per_s": round(summary.images / wall, 3)}
    seconds = getattr(labeler, "seconds", None)
    if seconds:  # a Ray run: the engine's work in the actors, and Ray's on top of it, per image
        row["actor_label_s_per_image"] = round(seconds["label"] / summary.images, 4)
        row["ray_overhead_s_per_image"] = round((seconds["actor call"] - seconds["label"] + seconds["driver"]
                                                 + seconds["decoder pickle"]) / summary.images, 4)
        row["seconds_per_image"] = {k: round(v / summary.images, 4) for k, v in sorted(seconds.items())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--boxes-per-image", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the 2-actor run")
    args = parser.parse_args()

    import ray
    import torch

    from ovsam_model.labeling.ray_runner import RaySettings

    images, ann, boxes = detections(args.images, args.boxes_per_image)
    common = dict(images=images, boxes=boxes, ann=ann, model="tiny", device="cpu", batch_size=args.batch_size)
    cpus = os.cpu_count() or 1
    print(json.dumps({"images": args.images, "boxes": len(boxes), "batch_size": args.batch_size, "cpus": cpus,
                      "load_average": os.getloadavg()}), flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        rows["plain"] = timed("plain", tmp / "plain.json", workers=1, **common)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rows["plain-1t"] = timed("plain-1t", tmp / "plain1.json", workers=1, **common)
        torch.set_num_threads(threads)

        started = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        ray_init = time.perf_counter() - started
        print(json.dumps({"ray_init_s": round(ray_init, 2)}), flush=True)
        runs = [("ray-1", RaySettings(actors=1, cpus_per_actor=1, progress=False))]
        if not args.quick:
            runs.append(("ray-2", RaySettings(actors=2, cpus_per_actor=max(0.5, (cpus - 1) / 2), progress=False)))
        for name, settings in runs:
            rows[name] = timed(name, tmp / f"{name}.json", ray=settings, **common)
            rows[name]["identical_to_plain_1t"] = (tmp / f"{name}.json").read_bytes() == (tmp / "plain1.json").read_bytes()
        ray.shutdown()
        torch.set_num_threads(1)  # the same baseline again: how much the machine's load moved meanwhile
        again = timed("plain-1t-again", tmp / "plain1b.json", workers=1, **common)
        torch.set_num_threads(threads)

    plain, one = rows["plain"], rows["plain-1t"]
    summary = {
        "ray_init_s": round(ray_init, 2),
        "ray-1 / plain (steady images/s)": round(rows["ray-1"]["steady_images_per_s"] / plain["steady_images_per_s"], 2),
        "ray-1 / plain (wall)": round(plain["wall_s"] / rows["ray-1"]["wall_s"], 2),
        "ray overhead per image, s (ray-1 steady − plain-1t steady)":
            round(1 / rows["ray-1"]["steady_images_per_s"] - 1 / one["steady_images_per_s"], 3),
        "ray overhead per image, s (measured in the actors and the driver, ray-1)": rows["ray-1"]["ray_overhead_s_per_image"],
        "engine work per image in the actor, s (ray-1)": rows["ray-1"]["actor_label_s_per_image"],
        "start-up to the first block, s (plain, ray-1)": [plain["first_block_s"], rows["ray-1"]["first_block_s"]],
        "identical bytes": {k: v.get("identical_to_plain_1t") for k, v in rows.items() if k.startswith("ray")},
        "drift: plain-1t again / plain-1t (steady images/s)": round(again["steady_images_per_s"] / one["steady_images_per_s"], 2),
    }
    if "ray-2" in rows:
        summary["ray-2 / plain (steady images/s)"] = round(rows["ray-2"]["steady_images_per_s"] / plain["steady_images_per_s"], 2)
        summary["ray-2 / ray-1 (steady images/s)"] = round(rows["ray-2"]["steady_images_per_s"] / rows["ray-1"]["steady_images_per_s"], 2)
        summary["ray-2 / plain (wall)"] = round(plain["wall_s"] / rows["ray-2"]["wall_s"], 2)
    print(json.dumps({"summary": summary}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
