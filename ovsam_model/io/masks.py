"""Boolean masks → COCO encodings (compressed RLE with str counts, polygons), boxes and areas.

All encodings come from pycocotools / OpenCV; masks go to uint8 without any float copy.
pycocotools encodes a Fortran-ordered H×W×N uint8 array, whose bytes are those of a C-ordered
[N, W, H] array: masks produced in that transposed layout (`transforms.iter_binary_masks_wh`)
are encoded without any copy.
"""

from __future__ import annotations

from typing import Union

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_rle(masks: torch.Tensor) -> list[dict]:
    """[N, H, W] bool → N compressed RLEs {"size": [H, W], "counts": str}."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    return encode_rle_wh(masks.transpose(1, 2))


def encode_rle_wh(masks_wh: torch.Tensor) -> list[dict]:
    """[N, W, H] bool (each mask transposed) → N compressed RLEs of the H×W masks.

    A C-contiguous input is handed to pycocotools as is (its bytes are the Fortran H×W×N array
    it wants); a strided one (e.g. `masks.transpose(1, 2)`) is copied once.
    """
    if masks_wh.dim() != 3:
        raise ValueError(f"masks must be [N, W, H], got {tuple(masks_wh.shape)}")
    if masks_wh.dtype != torch.bool:
        raise TypeError(f"masks must be bool, got {masks_wh.dtype}")
    if masks_wh.shape[0] == 0:
        return []
    arr = masks_wh.detach().cpu().contiguous().numpy().view(np.uint8)  # same bytes, no copy
    rles = mask_utils.encode(arr.transpose(2, 1, 0))  # Fortran H×W×N view of the same memory
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rle: dict) -> np.ndarray:
    """One compressed RLE (str or bytes counts) → [H, W] bool."""
    counts = rle["counts"]
    coded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coded).astype(bool)


def rle_area(rles: list[dict]) -> list[int]:
    """Pixel count of each RLE.

    One RLE per call: pycocotools 2.0.11 under NumPy 2 overflows on a list of 256 or more RLEs
    (`Python integer 256 out of bounds for uint8`), and 300 masks per image is the default.
    """
    return [int(mask_utils.area(rle)) for rle in rles]


def rle_bbox(rles: list[dict]) -> list[list[float]]:
    """XYWH box of each RLE ([0, 0, 0, 0] for an empty mask).

    One RLE per call: on a list, pycocotools decodes every RLE's counts into C arrays at once,
    which for thousands of detailed masks is gigabytes."""
    return [[float(v) for v in mask_utils.toBbox(rle)] for rle in rles]


def mask_stats_wh(masks_wh: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """[N, W, H] bool (each mask transposed, on any device) → each mask's pixel count and XYWH box,
    as pycocotools' `area` and `toBbox` give them for its RLE ([0, 0, 0, 0] when empty).

    A few reductions over the whole step where the masks are (on a GPU, before they leave it),
    instead of two pycocotools calls per mask that decode its RLE string: for an intricate mask
    (hair, foliage, or a model with random weights) that string runs to tens of kB. On a CPU,
    pycocotools is the faster for the compact masks of a trained model."""
    if masks_wh.dim() != 3:
        raise ValueError(f"masks must be [N, W, H], got {tuple(masks_wh.shape)}")
    as_bytes = masks_wh.view(torch.uint8)  # the reductions below are several times faster on bytes than on bool
    areas = as_bytes.sum(dim=(1, 2), dtype=torch.int64)

    def extent(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [N, L] 0/1 → first, last 1's index
        index, hit = torch.arange(hit.shape[1], device=hit.device), hit.bool()
        return torch.where(hit, index, hit.shape[1]).amin(1), torch.where(hit, index, -1).amax(1)

    (x0, x1), (y0, y1) = extent(as_bytes.amax(dim=2)), extent(as_bytes.amax(dim=1))
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1) * (areas > 0)[:, None]
    return areas.tolist(), boxes.float().tolist()


def mask_polygons(mask: Union[torch.Tensor, np.ndarray, dict]) -> list[list[float]]:
    """One [H, W] bool mask, or its RLE dict, → COCO polygons [[x1, y1, x2, y2, ...], ...] of the
    outer contours.

    Contours with fewer than 3 points (single pixels, thin lines) are dropped, so an empty or
    tiny mask gives []. Coordinates are pixel centres in original pixels. An RLE is decoded here,
    so a caller holding RLEs only ever has one full-size mask alive.
    """
    if isinstance(mask, dict):
        arr = decode_rle(mask)
    else:
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    contours, _ = cv2.findContours(np.ascontiguousarray(arr, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
