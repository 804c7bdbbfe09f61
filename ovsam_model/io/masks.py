"""Boolean masks → COCO encodings (compressed RLE with str counts, polygons), boxes and areas.

All encodings come from pycocotools / OpenCV; masks go to uint8 without any float copy.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils


def _fortran_hwn(masks: torch.Tensor) -> np.ndarray:
    """[N, H, W] bool → H×W×N uint8 in Fortran order (the layout `mask_utils.encode` wants)."""
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be bool, got {masks.dtype}")
    arr = masks.detach().cpu().numpy().view(np.uint8)  # same bytes, no copy
    # Fortran H×W×N has the same memory layout as C-contiguous N×W×H.
    return np.ascontiguousarray(arr.transpose(0, 2, 1)).transpose(2, 1, 0)


def encode_rle(masks: torch.Tensor) -> list[dict]:
    """[N, H, W] bool → N compressed RLEs {"size": [H, W], "counts": str}."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(_fortran_hwn(masks))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def rle_area(rles: list[dict]) -> list[int]:
    """Pixel count of each RLE.

    One RLE per call: pycocotools 2.0.11 under NumPy 2 overflows on a list of 256 or more RLEs
    (`Python integer 256 out of bounds for uint8`), and 300 masks per image is the default.
    """
    return [int(mask_utils.area(rle)) for rle in rles]


def rle_bbox(rles: list[dict]) -> list[list[float]]:
    """XYWH box of each RLE ([0, 0, 0, 0] for an empty mask)."""
    return [[float(v) for v in b] for b in mask_utils.toBbox(rles)] if rles else []


def mask_polygons(mask: torch.Tensor | np.ndarray) -> list[list[float]]:
    """[H, W] bool → COCO polygons [[x1, y1, x2, y2, ...], ...] of the outer contours.

    Contours with fewer than 3 points (single pixels, thin lines) are dropped, so an empty or
    tiny mask gives []. Coordinates are pixel centres in original pixels.
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    contours, _ = cv2.findContours(np.ascontiguousarray(arr, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
