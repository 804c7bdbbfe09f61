"""Overlay drawing with supervision's annotators: mask fill, mask outline, and a label with the
class and score. Masks are decoded from the records' RLE by pycocotools a few at a time
(`MASK_CHUNK`), so memory does not grow with the number of masks of an image.

Colours: by class without ground truth; with it, by match status (`STATUS_COLORS`), and the
missed GT instances are outlined in their own colour with the label "missed <class>".
Arrays are H×W×3 uint8 RGB in, RGB out (supervision draws on BGR internally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .match import CROWD, MATCHED, MISSED, UNMATCHED

MASK_CHUNK = 16  # full-size masks decoded at once
# RGB; the page's legend uses the same colours
STATUS_COLORS = {MATCHED: (30, 180, 60), UNMATCHED: (230, 40, 40), CROWD: (150, 150, 150), MISSED: (255, 170, 0)}


@dataclass(frozen=True)
class Shape:
    """One thing to draw: `rle` (compressed, at the image size) or None for a box only;
    `bbox` XYWH; `color_key`: palette index (class) or a `STATUS_COLORS` key; `text`: its label."""

    rle: Optional[dict]
    bbox: Sequence[float]
    color_key: int | str
    text: str
    outline_only: bool = False


def _xyxy(shape: Shape, height: int, width: int) -> list[float]:
    """Inclusive xyxy of the mask (its RLE's box; the record's box when the mask is empty)."""
    box = [float(v) for v in shape.bbox]
    if shape.rle is not None:
        x, y, w, h = (float(v) for v in mask_utils.toBbox(shape.rle))
        if w > 0 and h > 0:
            box = [x, y, w, h]
    x, y, w, h = box
    return [max(0.0, x), max(0.0, y), min(width - 1.0, x + max(w, 1.0) - 1), min(height - 1.0, y + max(h, 1.0) - 1)]


def _palette(keys: Sequence[int | str]):
    """supervision colours for `keys`: class keys from supervision's default palette, status keys
    from `STATUS_COLORS`; and the lookup array into that palette."""
    import supervision as sv

    default = sv.ColorPalette.DEFAULT.colors
    status_names = list(STATUS_COLORS)
    colors = list(default) + [sv.Color(*STATUS_COLORS[name]) for name in status_names]
    lookup = [len(default) + status_names.index(k) if isinstance(k, str) else int(k) % len(default) for k in keys]
    return sv.ColorPalette(colors), np.asarray(lookup, dtype=np.int64)


def _detections(shapes: Sequence[Shape], height: int, width: int, masks: Optional[np.ndarray] = None):
    import supervision as sv

    xyxy = np.asarray([_xyxy(s, height, width) for s in shapes], dtype=np.float32).reshape(-1, 4)
    return sv.Detections(xyxy=xyxy, mask=masks, class_id=np.zeros(len(shapes), dtype=int))


def _decoded(shapes: Sequence[Shape]) -> np.ndarray:
    """The shapes' masks as a (N, H, W) bool array (pycocotools' decoder)."""
    stacked = mask_utils.decode([dict(s.rle) for s in shapes])  # H×W×N, Fortran order
    return np.ascontiguousarray(stacked.transpose(2, 0, 1)).view(bool)


def draw_overlay(image: np.ndarray, shapes: Sequence[Shape], *, opacity: float = 0.45, thickness: int = 2,
                 text_scale: Optional[float] = None, chunk: int = MASK_CHUNK) -> np.ndarray:
    """`image` (H×W×3 RGB uint8) with every shape drawn: filled masks (except outline-only
    ones), their outlines, boxes for shapes without a mask, and the labels. Masks are decoded
    `chunk` at a time."""
    import supervision as sv

    height, width = image.shape[:2]
    if not shapes:
        return image.copy()
    scene = np.ascontiguousarray(image[:, :, ::-1])  # RGB → BGR for supervision/OpenCV
    palette, lookup = _palette([s.color_key for s in shapes])
    fill, outline = sv.MaskAnnotator(color=palette, opacity=opacity), sv.PolygonAnnotator(color=palette, thickness=thickness)
    with_mask = [i for i, s in enumerate(shapes) if s.rle is not None]
    for start in range(0, len(with_mask), chunk):
        part = with_mask[start: start + chunk]
        group = [shapes[i] for i in part]
        detections = _detections(group, height, width, _decoded(group))
        filled = np.asarray([not s.outline_only for s in group])
        if filled.any():
            fill.annotate(scene, detections[filled], custom_color_lookup=lookup[part][filled])
        outline.annotate(scene, detections, custom_color_lookup=lookup[part])
    boxes = [i for i, s in enumerate(shapes) if s.rle is None]
    if boxes:
        sv.BoxAnnotator(color=palette, thickness=thickness).annotate(
            scene, _detections([shapes[i] for i in boxes], height, width), custom_color_lookup=lookup[boxes])
    scale = text_scale if text_scale is not None else max(0.4, min(1.2, max(height, width) / 1400))
    sv.LabelAnnotator(color=palette, text_scale=scale, text_padding=3, smart_position=True).annotate(
        scene, _detections(shapes, height, width), labels=[s.text for s in shapes], custom_color_lookup=lookup)
    return np.ascontiguousarray(scene[:, :, ::-1])


def save_jpeg(array: np.ndarray, path, *, quality: int = 90, max_side: Optional[int] = None) -> tuple[int, int]:
    """Write `array` (RGB) as JPEG, downscaled to fit `max_side` when given; returns (width, height)."""
    im = Image.fromarray(array)
    if max_side is not None:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    im.save(path, format="JPEG", quality=quality, optimize=False)
    return im.size


def shape_text(name: str, score: Optional[float]) -> str:
    """The label drawn next to a mask: the class name and score ("person 0.93"). OpenCV draws
    ASCII only, so other characters become '?'."""
    text = name if score is None else f"{name} {score:.2f}"
    return text.encode("ascii", "replace").decode("ascii")


def category_colors(category_ids: Sequence[int]) -> Mapping[int, int]:
    """A stable palette index per category id (its rank in `category_ids`)."""
    return {cid: i for i, cid in enumerate(category_ids)}
