"""CLIP2SAM training data (spec §6): COCO/LVIS instances → augmented images with 40 prompts each.

Frames: masks, boxes and points are in the model frame (the 1024² padded square). Boxes are XYXY
covering whole pixels (a mask on columns i..j spans [i, j + 1)); points are integer pixel
coordinates (x, y) of a mask pixel (SAM's prompt encoder adds the +0.5 centre shift).

Randomness is drawn from `numpy.random.default_rng((seed, epoch, index))`, so an image's
augmentation and prompts do not depend on worker processes, ranks, or where a run was resumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..io.datasets import lvis_file_name
from ..io.images import read_image
from ..splits import coco_split_ids, lvis_split_ids
from ..vocab import Vocabulary, vocabulary_from_categories

RESIZE_RATIOS = {"coco": (0.9, 2.0), "lvis": (0.1, 2.0)}
MIN_MASK_AREA = 32


class FinetuneDataError(ValueError):
    """Unusable annotations or images."""


@dataclass
class TrainImage:
    file: Path
    height: int
    width: int
    anns: list[dict]  # the kept (base-class, non-crowd) annotations


@dataclass
class Augment:
    """flip: horizontal-flip probability; ratio: range of the random factor on the `size` scale;
    crop: random crop to size² (else the image is only resized and padded)."""

    flip: float = 0.5
    ratio: tuple[float, float] = (0.9, 2.0)
    crop: bool = True
    min_area: int = MIN_MASK_AREA


def read_annotations(ann: Path, dataset: str) -> tuple[dict, Vocabulary, set[int]]:
    """(the instances JSON, the vocabulary of every class in it, the ids of the trainable classes:
    COCO's 48 base classes, LVIS's frequent + common)."""
    try:
        gt = json.loads(Path(ann).read_text())
    except (OSError, ValueError) as e:
        raise FinetuneDataError(f"cannot read annotations {ann}: {e}") from e
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= gt.keys():
        raise FinetuneDataError(f"{ann}: not a COCO/LVIS instances file (needs images, annotations, categories)")
    vocab = vocabulary_from_categories(gt["categories"], name=Path(ann).name)
    split = coco_split_ids if dataset == "coco" else lvis_split_ids
    base, _ = split(gt["categories"])
    return gt, vocab, set(base)


def collect_images(gt: dict, images_dir: Path, base_ids: set[int], size: int = 1024,
                   min_area: int = MIN_MASK_AREA) -> list[TrainImage]:
    """Images with at least one non-crowd base-class instance whose area, scaled to the `size`
    frame, is ≥ `min_area`; in image-id order."""
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) or int(a["category_id"]) not in base_ids or not a.get("segmentation"):
            continue
        by_image.setdefault(int(a["image_id"]), []).append(a)
    out = []
    for im in sorted(gt["images"], key=lambda r: int(r["id"])):
        anns = by_image.get(int(im["id"]), [])
        h, w = int(im["height"]), int(im["width"])
        scale = (size / max(h, w)) ** 2
        if not any(float(a.get("area", 0)) * scale >= min_area for a in anns):
            continue
        name = im.get("file_name") or lvis_file_name(Path(images_dir), str(im.get("coco_url", "")))
        out.append(TrainImage(file=Path(images_dir) / name, height=h, width=w, anns=anns))
    return out


def decode_masks(anns: list[dict], height: int, width: int) -> np.ndarray:
    """COCO polygons / RLEs → [M, H, W] uint8 (pycocotools)."""
    out = np.zeros((len(anns), height, width), dtype=np.uint8)
    for i, a in enumerate(anns):
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out[i] = mask_utils.decode(rle)
    return out


def source_index(out_len: int, offset: int, resized: int, source: int) -> np.ndarray:
    """Nearest source index for each of `out_len` output pixels taken from a 1-D resize of
    `source` → `resized` pixels starting at `offset` (centre-aligned, as bilinear resizing)."""
    pos = (np.arange(out_len) + offset + 0.5) * (source / resized)
    return np.minimum(np.floor(pos).astype(np.int64), source - 1)


@dataclass(frozen=True)
class AugmentDraw:
    """One draw of the augmentation: flip, the resized size (nh, nw), whether that is a shrink
    (antialiased), and the crop offset (oy, ox). Equal draws give equal pixels and masks (the key
    of `FinetuneDataset`'s memo)."""

    flip: bool
    nh: int
    nw: int
    shrink: bool
    oy: int
    ox: int


def draw_augment(rng: np.random.Generator, height: int, width: int, size: int, aug: Augment) -> AugmentDraw:
    """Flip, then the random resize of the `size` scale, then the crop offset (in that order)."""
    flip = bool(rng.random() < aug.flip)
    ratio = rng.uniform(*aug.ratio)
    scale = size * ratio / max(height, width)
    nh, nw = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    oy = int(rng.integers(0, nh - size + 1)) if aug.crop and nh > size else 0
    ox = int(rng.integers(0, nw - size + 1)) if aug.crop and nw > size else 0
    return AugmentDraw(flip, nh, nw, bool(scale < 1), oy, ox)


def apply_augment(image: np.ndarray, masks: np.ndarray, size: int, draw: AugmentDraw, min_area: int,
                  mean, std) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """image [H, W, 3] uint8; masks [M, H, W] uint8 → (pixels [3, size, size] normalised,
    masks [M, size, size] bool in the model frame, the kept-instance flags [M] bool: ≥ `min_area` px)."""
    h, w = image.shape[:2]
    nh, nw, oy, ox = draw.nh, draw.nw, draw.oy, draw.ox
    ch, cw = min(nh - oy, size), min(nw - ox, size)
    if draw.flip:
        image = image[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=draw.shrink)[0]
    x = x[:, oy : oy + ch, ox : ox + cw].clamp(0, 255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    pixels = F.pad(x, (0, size - cw, 0, size - ch))
    rows = source_index(ch, oy, nh, h)
    cols = source_index(cw, ox, nw, w)
    if draw.flip:
        cols = w - 1 - cols
    out = np.zeros((masks.shape[0], size, size), dtype=bool)
    out[:, :ch, :cw] = masks[:, rows[:, None], cols[None, :]] > 0
    keep = out.reshape(out.shape[0], -1).sum(1) >= min_area
    return pixels.contiguous(), out, keep


def mask_box(mask: np.ndarray) -> list[float]:
    """XYXY of a non-empty [H, W] mask, covering whole pixels."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def make_prompts(masks: np.ndarray, count: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`count` prompts over the M instances of masks [M, S, S] bool (all non-empty).

    Instances are repeated to reach `count` (or `count` of them drawn when M > count), shuffled;
    the first half are box prompts (the mask's box), the rest one random pixel inside the mask.
    → instance [count] long, is_box [count] bool, boxes [count, 4], points [count, 1, 2].
    """
    m = masks.shape[0]
    if m >= count:
        inst = rng.choice(m, size=count, replace=False)
    else:
        inst = rng.permutation(np.tile(np.arange(m), math.ceil(count / m))[:count])
    n_box = count // 2
    boxes = np.array([mask_box(masks[i]) for i in inst], dtype=np.float32).reshape(count, 4)
    points = np.zeros((count, 1, 2), dtype=np.float32)
    for j in range(n_box, count):
        ys, xs = np.nonzero(masks[inst[j]])
        k = int(rng.integers(0, len(xs)))
        points[j, 0] = (xs[k], ys[k])
    is_box = np.arange(count) < n_box
    return {"instance": torch.from_numpy(inst.astype(np.int64)), "is_box": torch.from_numpy(is_box),
            "boxes": torch.from_numpy(boxes), "points": torch.from_numpy(points)}


class FinetuneDataset(Dataset):
    """One item per image: pixels [3, S, S], masks [M, S, S] bool, labels [M] (vocabulary
    indices), the prompts of `make_prompts` (indexing the M instances), and `index` and
    `augment` (its `AugmentDraw`): equal (index, augment) pairs have equal pixels.

    memo: keep each (index, draw)'s pixels and masks in this process, so that an image seen
    again with the same draw is not read and resized again (useful only when the draws repeat:
    a fixed scale, `Augment.ratio` (r, r); with flips, two draws per image; and only with no
    DataLoader workers, which start afresh every epoch)."""

    def __init__(self, images: list[TrainImage], vocab: Vocabulary, size: int, mean, std, aug: Augment,
                 prompts_per_image: int = 40, seed: int = 0, memo: bool = False) -> None:
        self.images, self.size, self.mean, self.std, self.aug = images, size, mean, std, aug
        self.index = {cid: i for i, cid in enumerate(vocab.category_ids)}
        self.count, self.seed, self.epoch = prompts_per_image, seed, 0
        self.memo: Optional[dict[tuple[int, AugmentDraw], tuple]] = {} if memo else None
        self._shapes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, item: TrainImage) -> tuple[np.ndarray, np.ndarray]:
        try:
            # the annotations' frame: EXIF orientation applied where the JSON's size says so
            image = read_image(item.file, exif="auto", expected_hw=(item.height, item.width)).array
        except (OSError, ValueError) as e:
            raise FinetuneDataError(f"cannot read image {item.file}: {e}") from e
        return image, decode_masks(item.anns, image.shape[0], image.shape[1])

    def __getitem__(self, i: int) -> dict:
        item = self.images[i]
        labels = np.array([self.index[int(a["category_id"])] for a in item.anns], dtype=np.int64)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        source = None  # (image, masks): read unless every draw below is memoised
        shape = self._shapes.get(i)
        if shape is None:
            source = self._read(item)
            shape = source[0].shape[:2]
            if self.memo is not None:
                self._shapes[i] = shape
        # A crop can lose every instance: draw again; the last try keeps the whole image.
        for attempt in range(4):
            aug = self.aug if attempt < 3 else Augment(flip=self.aug.flip, ratio=(1.0, 1.0), crop=False,
                                                       min_area=self.aug.min_area)
            draw = draw_augment(rng, shape[0], shape[1], self.size, aug)
            done = self.memo.get((i, draw)) if self.memo is not None else None
            if done is None:
                if source is None:
                    source = self._read(item)
                done = apply_augment(*source, self.size, draw, aug.min_area, self.mean, self.std)
                if self.memo is not None:
                    self.memo[(i, draw)] = done
            pixels, out, keep = done
            if keep.any():
                break
        if not keep.any():  # every mask under min_area even at scale 1: keep the largest non-empty
            areas = out.reshape(out.shape[0], -1).sum(1)
            keep = (areas == areas.max()) & (areas > 0)
            if not keep.any():
                raise FinetuneDataError(f"{item.file}: no instance mask survives the resize")
        out, labels = out[keep], labels[keep]
        prompts = make_prompts(out, self.count, rng)
        # ship only the masks the prompts use (an LVIS image can have hundreds of instances)
        used, prompts["instance"] = torch.unique(prompts["instance"], return_inverse=True)
        used = used.numpy()
        return {"pixels": pixels, "masks": torch.from_numpy(out[used]), "labels": torch.from_numpy(labels[used]),
                "index": i, "augment": draw, **prompts}


def collate(items: list[dict]) -> dict:
    """Stacked pixels [B, 3, S, S]; everything else stays a per-image list."""
    return {"pixels": torch.stack([it["pixels"] for it in items]),
            **{k: [it[k] for it in items] for k in items[0] if k != "pixels"}}


def resize_ratio(dataset: str, override: Optional[tuple[float, float]] = None) -> tuple[float, float]:
    return tuple(override) if override is not None else RESIZE_RATIOS[dataset]
