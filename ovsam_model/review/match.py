"""Predictions against ground truth: each prediction matched or not, and the missed GT instances.

Matching is COCO's greedy rule at one threshold: predictions by descending score (ties: record
order), each taking the unmatched non-crowd GT instance of its class with the highest IoU ≥
`iou_thr`. A prediction left unmatched that overlaps a crowd region of its class by ≥ `iou_thr`
(crowd IoU: the intersection over the prediction's area) is "crowd", which COCO ignores.
IoU is pycocotools' `mask.iou` on RLE (masks), or on boxes for a prediction without a mask.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ovsam_model.io.detections import InputError
from ovsam_model.io.json_files import read_json

MATCHED, UNMATCHED, CROWD, MISSED = "matched", "unmatched", "crowd", "missed"


def gt_rle(annotation: Mapping[str, Any], height: int, width: int) -> Optional[dict]:
    """A GT annotation's mask as compressed RLE (the labeling reader's conversion), None when it
    has no usable segmentation (then it is matched by box)."""
    from ovsam_model.labeling.read_output import to_rle

    segmentation = annotation.get("segmentation")
    if not segmentation:
        return None
    try:
        return to_rle(segmentation, height, width)
    except (ValueError, TypeError):
        return None


@dataclass
class GroundTruth:
    """A COCO/LVIS dataset JSON's annotations, by image id; `sizes`: (height, width) by id."""

    path: Path
    sizes: dict[int, tuple[int, int]]
    annotations: dict[int, list[dict]] = field(default_factory=dict)
    categories: list[dict] = field(default_factory=list)

    def of(self, image_id: int) -> list[dict]:
        return self.annotations.get(image_id, [])


def load_ground_truth(path: Path) -> GroundTruth:
    """Read `--gt`: a dataset JSON with images, annotations and categories (InputError otherwise)."""
    path = Path(path)
    data = read_json(path, f"--gt {path}")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InputError(f"--gt {path}: not a COCO/LVIS dataset JSON (needs 'images', 'annotations' and 'categories' lists)")
    try:
        sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in data["images"]}
        gt = GroundTruth(path, sizes, categories=[c for c in data["categories"] if isinstance(c, dict)])
        for i, ann in enumerate(data["annotations"]):
            for key in ("image_id", "category_id"):
                if key not in ann:
                    raise InputError(f"--gt {path}: annotations[{i}]: missing field '{key}'")
            gt.annotations.setdefault(int(ann["image_id"]), []).append(ann)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"--gt {path}: malformed image or annotation ({type(exc).__name__}: {exc})") from None
    return gt


def _box(record: Mapping[str, Any]) -> list[float]:
    return [float(v) for v in (record.get("bbox") or (0, 0, 0, 0))[:4]]


@dataclass
class ImageMatch:
    """`status[i]`: the i-th prediction's status; `missed`: indices of unmatched non-crowd GT."""

    status: list[str]
    missed: list[int]
    gt_rles: list[Optional[dict]]


def match_image(predictions: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], height: int, width: int,
                iou_thr: float = 0.5) -> ImageMatch:
    """Match one image's predictions (records with `segmentation` RLE, or only `bbox`) to its GT."""
    gt_rles = [gt_rle(g, height, width) for g in gts]
    crowd = [bool(g.get("iscrowd", 0)) for g in gts]
    status = [UNMATCHED] * len(predictions)
    taken = [False] * len(gts)
    gts_of: dict[int, list[int]] = defaultdict(list)
    for j, g in enumerate(gts):
        gts_of[int(g["category_id"])].append(j)
    preds_of: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(predictions):
        preds_of[int(p["category_id"])].append(i)
    for category, pred_ids in preds_of.items():
        gt_ids = gts_of.get(category, [])
        if not gt_ids:
            continue
        ious = iou_matrix([predictions[i] for i in pred_ids], [gts[j] for j in gt_ids], [gt_rles[j] for j in gt_ids],
                          [crowd[j] for j in gt_ids])
        for row in sorted(range(len(pred_ids)), key=lambda r: (-float(predictions[pred_ids[r]].get("score", 1.0)), r)):
            best, best_iou = None, iou_thr
            for col, j in enumerate(gt_ids):
                if not crowd[j] and not taken[j] and ious[row, col] >= best_iou:
                    best, best_iou = j, ious[row, col]
            if best is not None:
                taken[best] = True
                status[pred_ids[row]] = MATCHED
            elif any(crowd[j] and ious[row, col] >= iou_thr for col, j in enumerate(gt_ids)):
                status[pred_ids[row]] = CROWD
    missed = [j for j in range(len(gts)) if not crowd[j] and not taken[j]]
    return ImageMatch(status, missed, gt_rles)


def iou_matrix(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], gt_rles: Sequence[Optional[dict]],
               crowd: Sequence[bool]) -> np.ndarray:
    """[len(preds), len(gts)] pycocotools IoU (crowd GT: intersection over the prediction's area):
    mask against mask where both have one, else box against box."""
    out = np.zeros((len(preds), len(gts)))
    masked_preds = [i for i, p in enumerate(preds) if isinstance(p.get("segmentation"), dict)]
    masked_gts = [j for j, rle in enumerate(gt_rles) if rle is not None]
    if masked_preds and masked_gts:
        ious = mask_utils.iou([preds[i]["segmentation"] for i in masked_preds], [gt_rles[j] for j in masked_gts],
                              [int(crowd[j]) for j in masked_gts])
        out[np.ix_(masked_preds, masked_gts)] = np.asarray(ious).reshape(len(masked_preds), len(masked_gts))
    with_masks = set(masked_preds), set(masked_gts)
    rest = [(i, j) for i in range(len(preds)) for j in range(len(gts)) if i not in with_masks[0] or j not in with_masks[1]]
    for i, j in rest:  # a box-only prediction or GT: box IoU
        out[i, j] = float(np.asarray(mask_utils.iou([_box(preds[i])], [_box(gts[j])], [int(crowd[j])])).reshape(-1)[0])
    return out
