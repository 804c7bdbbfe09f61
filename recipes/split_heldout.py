"""Split a COCO-style instances JSON by image into a training part and a held-out part, for the
small learning runs (`tiny_distill.sh`, `tiny_finetune.sh`).

usage: python recipes/split_heldout.py ANN IMAGES OUT [--heldout 0.25] [--min-area 4096]

The held-out images are the last quarter of the image ids (sorted), so the split is the same on
every machine. Writes OUT/train.json and OUT/heldout.json with the instances of area ≥
--min-area px (at 256² inputs a COCO object under 64² px is a few pixels of the 64² mask:
nothing a small run can learn), keeping the images that have one, and OUT/train_images/ and
OUT/heldout_images/ with links to every image of each part (distillation needs no annotations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ann", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--heldout", type=float, default=0.25, help="fraction of the images held out")
    parser.add_argument("--min-area", type=float, default=64 * 64, help="smallest instance area kept (px)")
    args = parser.parse_args(argv)
    try:
        gt = json.loads(args.ann.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {args.ann}: {e}", file=sys.stderr)
        return 2
    images = sorted(gt["images"], key=lambda im: int(im["id"]))
    cut = len(images) - max(1, math.ceil(args.heldout * len(images)))
    if cut < 1:
        print(f"error: {args.ann}: {len(images)} image(s) are too few to split", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", images[:cut]), ("heldout", images[cut:])):
        ids = {int(im["id"]) for im in part}
        anns = [a for a in gt["annotations"]
                if int(a["image_id"]) in ids and not a.get("iscrowd", 0) and float(a["area"]) >= args.min_area]
        with_anns = {int(a["image_id"]) for a in anns}
        kept = {**gt, "images": [im for im in part if int(im["id"]) in with_anns], "annotations": anns}
        (args.out / f"{name}.json").write_text(json.dumps(kept))
        links = args.out / f"{name}_images"
        links.mkdir(exist_ok=True)
        for im in part:
            link = links / Path(im["file_name"]).name
            if not link.exists():
                os.symlink((args.images / im["file_name"]).resolve(), link)
        print(f"{name}: {len(part)} images in {links}, {len(anns)} instances on {len(kept['images'])} images in "
              f"{args.out / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
