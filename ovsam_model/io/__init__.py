"""Inputs and outputs of `ovsam label`: detector files, dataset JSON, masks, writers, image loading."""

from ovsam_model.io.datasets import ImageRecord, ImageSource, load_image_source
from ovsam_model.io.detections import (
    InputError,
    PromptRecord,
    PromptSet,
    RawRecord,
    SkipReason,
    prompts_for,
    read_box_records,
    read_point_records,
    select_prompts,
)
from ovsam_model.io.masks import encode_rle, mask_polygons, rle_area, rle_bbox

__all__ = [
    "ImageRecord",
    "ImageSource",
    "InputError",
    "PromptRecord",
    "PromptSet",
    "RawRecord",
    "SkipReason",
    "encode_rle",
    "load_image_source",
    "mask_polygons",
    "prompts_for",
    "read_box_records",
    "read_point_records",
    "rle_area",
    "rle_bbox",
    "select_prompts",
]
