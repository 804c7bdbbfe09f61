"""Proposals protocol (the SAM paper's zero-shot object proposals): class-agnostic average recall.

Any COCO results array (e.g. `ovsam label` output, or masks from an automatic mask generator) is
scored against a COCO-format ground truth (COCO or LVIS JSON) with pycocotools `COCOeval` and
`params.useCats = 0`: categories are ignored on both sides, every GT instance may be recalled by
any proposal of its image, and the top N proposals per image by score are kept for AR@N.

The results are loaded as the detector protocol loads them (`detector.load_predictions`,
`check_ids`, `prepare_predictions`, `run_coco_eval`): inputs are never mutated, `bbox` is dropped
for `segm` so that areas come from the masks, an empty result list gives recall 0, and image ids
absent from the ground truth are named in a ValueError. Unlike there, `category_id` is optional
and may be any value: both sides are put in one category "object" before evaluation (with
`useCats = 0` pycocotools would otherwise silently drop results whose category is not in the GT),
and GT annotations without `iscrowd` (LVIS) count as non-crowd.

AR@N reads `eval["recall"]` [T, K, A, M] at the index of N in `params.maxDets`, as
`COCOeval.summarize` does (mean over the IoU thresholds 0.50:0.95 of the values > -1, else -1).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval

from ovsam_model.eval.detector import (
    IouType,
    check_ids,
    load_ground_truth,
    load_predictions,
    prepare_predictions,
    run_coco_eval,
)
from ovsam_model.eval.report import ProposalResult

PROPOSAL_MAX_DETS = (1, 10, 100, 1000)
AREAS = (("small", "ARs"), ("medium", "ARm"), ("large", "ARl"))
AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}


def class_agnostic_ground_truth(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of a COCO / LVIS dataset dict with one category and `iscrowd` on every annotation."""
    cat = AGNOSTIC_CATEGORY["id"]
    anns = [{**a, "category_id": cat, "iscrowd": int(a.get("iscrowd", 0) or 0)} for a in gt["annotations"]]
    return {**gt, "categories": [dict(AGNOSTIC_CATEGORY)], "annotations": anns}


def average_recall(ev: COCOeval, max_dets: int, area: str = "all") -> float:
    """pycocotools' AR summary for one maxDets value and area range (-1 when there is no GT there)."""
    p = ev.params
    s = ev.eval["recall"][:, :, p.areaRngLbl.index(area), p.maxDets.index(max_dets)]  # [T, K]
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_proposals(
    gt: str | os.PathLike | Mapping[str, Any],
    predictions: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    iou_type: IouType = "segm",
    max_dets: Sequence[int] = PROPOSAL_MAX_DETS,
) -> ProposalResult:
    """Class-agnostic AR of a COCO results array against a COCO-format ground truth (inputs are not modified).

    Metrics: AR@N for every N in `max_dets`, then ARs/ARm/ARl at the largest N.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    dets = sorted({int(m) for m in max_dets})
    if not dets or dets[0] < 1:
        raise ValueError(f"max_dets must be positive integers, not {list(max_dets)!r}")
    gt_data = load_ground_truth(gt)
    preds = load_predictions(predictions, required=("image_id", "score"))
    check_ids(gt_data, preds, categories=False)
    prepared = prepare_predictions(gt_data, preds, iou_type)  # deep copies
    for p in prepared:
        p["category_id"] = AGNOSTIC_CATEGORY["id"]
    ev = run_coco_eval(class_agnostic_ground_truth(gt_data), prepared, iou_type, use_cats=False, max_dets=dets)

    top = dets[-1]
    metrics = {f"AR@{m}": average_recall(ev, m) for m in dets}
    metrics.update({f"{key}@{top}": average_recall(ev, top, area) for area, key in AREAS})
    num_instances = sum(1 for a in gt_data["annotations"] if not a.get("iscrowd"))
    notes = [
        "pycocotools COCOeval with useCats=0: class-agnostic, categories of --pred and --ann are ignored",
        f"AR@N: recall averaged over IoU 0.50:0.95 with the top N proposals per image by score; "
        f"ARs/ARm/ARl at {top}",
        f"{num_instances} non-crowd ground-truth instances on {len(gt_data['images'])} images "
        "(crowd regions are ignored)",
        "n/a (-1 in --json) = undefined (no ground truth in that area range)",
    ]
    if iou_type == "segm":
        notes.insert(1, "areas of the proposals come from their masks (bbox dropped)")
    return ProposalResult(
        iou_type=iou_type,
        metrics=metrics,
        max_dets=dets,
        num_images=len(gt_data["images"]),
        num_predictions=len(preds),
        num_instances=num_instances,
        notes=notes,
    )
