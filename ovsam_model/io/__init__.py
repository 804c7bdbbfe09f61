"""Inputs and outputs of a labeling run: detector files, dataset JSON, image decoding, masks.

Names are imported on first use, so that reading and checking input files never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ImageRecord": "datasets", "ImageSource": "datasets", "load_image_source": "datasets",
    "InputError": "detections", "PromptRecord": "detections", "PromptSet": "detections", "RawRecord": "detections",
    "SkipReason": "detections", "prompts_for": "detections", "read_box_records": "detections",
    "read_point_records": "detections", "select_prompts": "detections",
    "encode_rle": "masks", "mask_polygons": "masks", "rle_area": "masks", "rle_bbox": "masks",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
