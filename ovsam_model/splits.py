"""Open-vocabulary splits (spec §7): COCO 48/17 (Zareian et al.) and LVIS frequent+common / rare."""

from __future__ import annotations

from typing import Iterable, Mapping

COCO_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
COCO_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis",
    "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop",
    "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase",
    "toothbrush",
)
# The 15 COCO classes that the open-vocabulary protocol leaves out.
COCO_EXCLUDED: tuple[str, ...] = (
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
    "cell phone", "teddy bear", "hair drier",
)


def coco_split_ids(categories: Iterable[Mapping]) -> tuple[list[int], list[int]]:
    """(base ids, novel ids) of a COCO category list ({"id", "name"} records)."""
    by_name = {c["name"]: int(c["id"]) for c in categories}
    missing = [n for n in COCO_BASE + COCO_NOVEL if n not in by_name]
    if missing:
        raise ValueError(f"category list lacks COCO classes: {', '.join(missing)}")
    return [by_name[n] for n in COCO_BASE], [by_name[n] for n in COCO_NOVEL]


def lvis_split_ids(categories: Iterable[Mapping]) -> tuple[list[int], list[int]]:
    """(base = frequent + common ids, novel = rare ids) from the LVIS `frequency` field."""
    cats = list(categories)
    if any("frequency" not in c for c in cats):
        raise ValueError("LVIS categories need a 'frequency' field (r/c/f)")
    base = [int(c["id"]) for c in cats if c["frequency"] in ("f", "c")]
    novel = [int(c["id"]) for c in cats if c["frequency"] == "r"]
    return base, novel
