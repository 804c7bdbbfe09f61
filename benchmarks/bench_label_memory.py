"""Peak memory of a labeling run (`ovsam_model.labeling`) with the `tiny` model on CPU.

Each case runs in a fresh child process and reports that child's peak RSS (VmHWM):
  label  one image of W×H (a real COCO image resized) with N random boxes, written to a results file:
         targets: 5,000 boxes ≤ 1.3× the peak of 300 boxes on 640×480; 300 boxes on 4000×3000 ≤ 2 GiB.
  merge  the merge step alone (part files → output) for N images, made by repeating the entries of
         the labeled mini-val images under new ids: target, peak independent of N (32 vs 3,200).

    python benchmarks/bench_label_memory.py                # all cases, a table and the verdicts
    python benchmarks/bench_label_memory.py --quick        # smaller cases (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OVSAM_TEST_DATA", REPO.parent / "shared" / "data"))


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_boxes(image_id: int, width: int, height: int, n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width * 0.8, n)
    y1 = rng.uniform(0, height * 0.8, n)
    w = rng.uniform(8, width * 0.5, n).clip(max=width - x1)
    h = rng.uniform(8, height * 0.5, n).clip(max=height - y1)
    return [{"image_id": image_id, "bbox": [float(a), float(b), float(c), float(d)], "score": 0.9}
            for a, b, c, d in zip(x1, y1, w, h)]


def child_label(workdir: Path, width: int, height: int, boxes: int) -> dict:
    from PIL import Image

    from ovsam_model import label_images

    source = sorted((DATA / "coco-val2017-mini" / "images").glob("*.jpg"))[0]
    Image.open(source).convert("RGB").resize((width, height)).save(workdir / "000000000001.jpg", quality=90)
    dets = _random_boxes(1, width, height, boxes)
    started = time.monotonic()
    summary = label_images(workdir, boxes=dets, out=workdir / "out.json", model="tiny", device="cpu", workers=0,
                           batch_size=1, max_dets=boxes)
    return {"records": summary.records, "seconds": round(time.monotonic() - started, 1)}


def child_merge(workdir: Path, images: int) -> dict:
    from ovsam_model.labeling.engine import merge_parts
    from ovsam_model.labeling.formats import get_format

    started = time.monotonic()
    with open(workdir / "ids.json") as f:
        meta = json.load(f)
    out = workdir / f"merged_{images}.json"
    count = merge_parts(workdir / f"out_{images}.json", meta["fingerprint"], list(range(1, images + 1)), out,
                        get_format("dataset"), meta["categories"])
    return {"records": count, "seconds": round(time.monotonic() - started, 1), "bytes": out.stat().st_size}


def make_merge_parts(workdir: Path, counts: list[int]) -> None:
    """Label the mini-val images once (GT boxes), then write part files of `counts` images each by
    repeating those entries under new ids 1..N."""
    from ovsam_model.labeling import open_labeler
    from ovsam_model.labeling.parts import PartWriter, part_path

    root = DATA / "coco-val2017-mini"
    gt = json.loads((root / "instances.json").read_text())
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"] if not a["iscrowd"]]
    labeler = open_labeler(root / "images", boxes=boxes, ann=root / "instances.json", model="tiny", device="cpu",
                           workers=0)
    held = [e for e in labeler.entries() if e["records"]]
    for n in counts:
        writer = PartWriter(part_path(workdir / f"out_{n}.json"), "bench", {}, resume=False)
        for i in range(n):
            entry = json.loads(json.dumps(held[i % len(held)]))
            entry["image"]["id"] = i + 1
            for rec in entry["records"]:
                rec["image_id"] = i + 1
            writer.append([entry])
        writer.finish(1)
        writer.close()
    (workdir / "ids.json").write_text(json.dumps({"fingerprint": "bench", "categories": labeler.categories}))


def run_child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller cases (smoke run)")
    args = parser.parse_args()
    if args.child:
        kind, workdir, *rest = args.child
        result = child_label(Path(workdir), *map(int, rest)) if kind == "label" else child_merge(Path(workdir), int(rest[0]))
        result["peak_mib"] = round(_peak_mib())
        print(json.dumps(result))
        return
    big, many, merges = ((1600, 1200), 1000, [32, 320]) if args.quick else ((4000, 3000), 5000, [32, 3200])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h), n in [("640x480, 300 boxes", (640, 480), 300), (f"640x480, {many} boxes", (640, 480), many),
                                (f"{big[0]}x{big[1]}, 300 boxes", big, 300)]:
            work = Path(tmp) / name.replace(" ", "").replace(",", "_")
            work.mkdir()
            rows.append((f"label {name}", run_child(["label", str(work), str(w), str(h), str(n)])))
        merge_dir = Path(tmp) / "merge"
        merge_dir.mkdir()
        make_merge_parts(merge_dir, merges)
        for n in merges:
            rows.append((f"merge {n} images", run_child(["merge", str(merge_dir), str(n)])))
    print(f"{'case':34} {'peak RSS MiB':>12} {'seconds':>8} {'records':>8}")
    for name, r in rows:
        print(f"{name:34} {r['peak_mib']:>12} {r['seconds']:>8} {r['records']:>8}")
    few, lots = rows[0][1]["peak_mib"], rows[1][1]["peak_mib"]
    print(f"\n{many} vs 300 boxes: {lots / few:.2f}x (target ≤ 1.3x)")
    print(f"{big[0]}x{big[1]} with 300 boxes: {rows[2][1]['peak_mib'] / 1024:.2f} GiB (target ≤ 2 GiB at 4000x3000)")
    m0, m1 = rows[3][1]["peak_mib"], rows[4][1]["peak_mib"]
    print(f"merge {merges[1]} vs {merges[0]} images: {m1 / m0:.2f}x (target: independent of the number, ~1.0x)")


if __name__ == "__main__":
    main()
