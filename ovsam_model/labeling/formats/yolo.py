"""Ultralytics YOLO dataset folder: YOLO-seg polygons (default) or detection boxes.

Layout of `--out DIR` (flat, as ultralytics' own COCO converter writes it):

    DIR/data.yaml            path: DIR (absolute), train: images, val: images, nc, names {0: person, ...}
    DIR/labels/<stem>.txt    one line per instance: `class x1 y1 x2 y2 ...` (seg) or
                             `class cx cy w h` (`boxes=True`), coordinates normalised by width/height
    DIR/images/<stem><ext>   symlinks to the labeled images, when the images folder is known

Class ids are contiguous from 0: the categories sorted by id (so COCO id 1 "person" is 0), all of
them, also those no record uses, so that two exports of one vocabulary share their ids.
`<stem>` is the image's base name made safe (`io.safe_paths`): unique among the export's images
case-insensitively and ignoring extensions (`d1/img.jpg`, `d2/img.jpg` → `img`, `img~2`).
An image with no records gets an empty label file (a background image); an image that could not
be read gets none.

Polygons (multi-part masks and holes): each instance is one polygon, the mask's contours (all
outer parts and all holes, `cv2.RETR_CCOMP`) chained nearest-first and joined by zero-width
bridges between their closest points, as ultralytics joins the parts of a multi-part COCO
polygon. Filling it (`cv2.fillPoly`, what ultralytics and supervision do) gives back the mask with
its holes and every part, plus the 1-pixel lines of the bridges between parts (and across a hole
to an island inside it). Noisy masks of more than `FEW_CONTOURS` contours are bridged between the
contours' first points, chained along a Z-order curve (linear time, longer bridges). Vertices are pixel
coordinates (as COCO polygons from `io.masks.mask_polygons`) divided by the width or height and
rounded *up* at 6 decimals, so that readers that truncate (`int(x * w)`) get the same pixel.
A mask too small for 3 vertices (empty, or one pixel) is left out (`dropped`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np

from ovsam_model.io.safe_paths import clean_relative_path, inside, safe_relative_path

from ovsam_model.io.detections import InputError

from ..records import Entry
from .base import DirectoryFormat

DIGITS = 6
FEW_CONTOURS = 64  # up to this many contours, bridges join closest points (else first points)
_MAX_PAIRS = 4_000_000  # closest-point search between two contours: at most this many distances


class YoloDataset(DirectoryFormat):
    """A YOLO-seg (or, with `boxes`, YOLO detection) dataset folder; `images`: the folder the
    entries' file names are relative to, linked into `images/` (None: no links)."""

    name = "yolo"
    help = "ultralytics YOLO dataset folder (labels/*.txt polygons, or boxes with --yolo-boxes; data.yaml)"
    marker = "data.yaml"

    def __init__(self, *, boxes: bool = False, images: Optional[Path] = None) -> None:
        super().__init__()
        self.boxes = boxes
        self.images = None if images is None else Path(images)
        self.dropped = 0  # masks too small for a polygon
        self.unlinked = 0  # images not found under `images`

    def open_directory(self, categories: Sequence[dict]) -> None:
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        self.class_of = {int(c["id"]): i for i, c in enumerate(ordered)}
        self.names = [str(c.get("name", c["id"])) for c in ordered]
        self.used: set[str] = set()
        (self.root / "labels").mkdir()
        if self.images is not None:
            (self.root / "images").mkdir()

    def add(self, entry: Entry) -> None:
        records = entry["records"]
        if entry.get("skipped"):
            for _ in records:
                pass
            return
        image = entry["image"]
        stem_path = safe_relative_path(clean_relative_path(image["file_name"]).name, self.used, unique_stem=True)
        lines = []
        for record in records:
            line = self._line(record, image["height"], image["width"])
            if line is None:
                self.dropped += 1
            else:
                lines.append(line)
                self.count += 1
        label = self.path_for(PurePosixPath("labels") / stem_path.with_suffix(".txt"))
        label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self._link(image["file_name"], PurePosixPath("images") / stem_path)

    def _line(self, record: dict, height: int, width: int) -> Optional[str]:
        cls = self.class_of.get(int(record["category_id"]))
        if cls is None:
            raise InputError(f"image {record.get('image_id')}: category_id {record['category_id']} is not among "
                             f"the categories")
        if self.boxes:
            x, y, w, h = (float(v) for v in record["bbox"])
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                return None
            values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
            return f"{cls} " + " ".join(_fmt(v) for v in values)
        from ovsam_model.io.masks import decode_rle

        polygon = joined_polygon(decode_rle(record["segmentation"]))
        if len(polygon) < 3:
            return None
        scale = np.array([width, height], dtype=np.float64)
        return f"{cls} " + " ".join(_normalised(polygon / scale))

    def _link(self, file_name: str, relative: PurePosixPath) -> None:
        if self.images is None:
            return
        root = self.images.resolve()
        source = root / file_name
        if not (inside(root, source) and source.is_file()):
            self.unlinked += 1
            return
        os.symlink(source.resolve(), self.path_for(relative))

    def close_directory(self) -> None:
        import yaml

        data = {"path": str(self.out.resolve()), "train": "images", "val": "images", "nc": len(self.names),
                "names": dict(enumerate(self.names))}
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        self.path_for(PurePosixPath(self.marker)).write_text(text, encoding="utf-8")


def _fmt(value: float) -> str:
    """A normalised value with `DIGITS` decimals, without trailing zeros."""
    return f"{min(max(value, 0.0), 1.0):.{DIGITS}f}".rstrip("0").rstrip(".") or "0"


def _normalised(values: np.ndarray) -> list[str]:
    """Normalised coordinates rounded *up* at `DIGITS` decimals (a reader's `int(v * size)` gives
    the pixel back), as text without trailing zeros."""
    units = np.clip(np.ceil(values.reshape(-1) * 10**DIGITS - 1e-6), 0, 10**DIGITS).astype(np.int64)
    whole, frac = np.divmod(units, 10**DIGITS)
    return [f"{w}.{f:0{DIGITS}d}".rstrip("0").rstrip(".") for w, f in zip(whole.tolist(), frac.tolist())]


def joined_polygon(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool → one [N, 2] float polygon (x, y in pixels): every outer contour and hole of
    the mask, joined by zero-width bridges (see the module docstring). Empty mask → [0, 2].

    Up to `FEW_CONTOURS` contours are chained nearest-first and bridged at their closest points;
    beyond that (noisy masks: thousands of specks) they are chained along a Z-order curve of
    their first points and bridged there, in linear time."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1, 2).astype(np.float64) for c in contours]
    if not parts:
        return np.zeros((0, 2))
    if len(parts) == 1:
        return parts[0]
    if len(parts) > FEW_CONTOURS:
        return _bridged_at_first_points(parts)
    parts = _nearest_first(parts)
    links = [_closest_pair(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
    entry = [0] + [b for _, b in links]  # where each contour is entered
    leave: list[Optional[int]] = [a for a, _ in links] + [None]  # where it is left for the next
    forward, backward = [], []
    for k, part in enumerate(parts):
        turned = np.roll(part, -entry[k], axis=0)
        if leave[k] is None:  # the last contour: all the way round
            forward.append(np.concatenate([turned, turned[:1]]))
        else:  # out along one side, back along the other
            j = (leave[k] - entry[k]) % len(part)
            forward.append(turned[: j + 1])
            backward.append(np.concatenate([turned[j:], turned[:1]]))
    return np.concatenate(forward + backward[::-1])


def _bridged_at_first_points(parts: list[np.ndarray]) -> np.ndarray:
    """Each contour walked round from its first point back to it, the next one reached by a
    bridge between first points, and the way back along the same bridges."""
    firsts = np.array([p[0] for p in parts])
    order = np.argsort(_z_order(firsts), kind="stable")
    loops = [np.concatenate([parts[i], parts[i][:1]]) for i in order]
    return np.concatenate(loops + [firsts[order[-2::-1]]])


def _z_order(points: np.ndarray) -> np.ndarray:
    """Morton codes of [K, 2] non-negative pixel coordinates (bits of x and y interleaved)."""
    v = np.clip(points, 0, 2**16 - 1).astype(np.uint64)
    for shift, bits in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(bits)
    return v[:, 0] | (v[:, 1] << np.uint64(1))


def _nearest_first(parts: list[np.ndarray]) -> list[np.ndarray]:
    """The contours ordered from the longest, each followed by the remaining one whose centre is
    nearest to it (short bridges)."""
    centres = np.array([p.mean(axis=0) for p in parts])
    left = list(range(len(parts)))
    current = max(left, key=lambda i: len(parts[i]))
    order = [current]
    left.remove(current)
    while left:
        dist = ((centres[left] - centres[current]) ** 2).sum(axis=1)
        current = left.pop(int(dist.argmin()))
        order.append(current)
    return [parts[i] for i in order]


def _closest_pair(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(index in a, index in b) of the closest points; both contours are subsampled evenly when
    the full search would exceed `_MAX_PAIRS` distances."""
    step = max(1, math.ceil(math.sqrt(len(a) * len(b) / _MAX_PAIRS)))
    sa, sb = a[::step], b[::step]
    d = ((sa[:, None, :] - sb[None, :, :]) ** 2).sum(axis=-1)
    i, j = divmod(int(d.argmin()), len(sb))
    return i * step, j * step
