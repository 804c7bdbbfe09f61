"""One image's prediction → its COCO records, and the per-image entry that part files hold.

Records (one per kept prompt, in input order within an image):
  image_id, category_id, score, bbox (XYWH of the mask; of the prompt if the mask is empty),
  segmentation (compressed RLE with str counts at the original size), area (mask pixels),
  detector_score, detector_category_id, topk ([{category_id, prob}], the model's best labels).

Label sources:
  "ovsam":    category_id = vocabulary category of the model's label,
              score = detector score × label probability.
  "detector": category_id and score are the detector's; the model only adds the mask.

An entry is `{"image": {id, file_name, height, width}, "records": [...]}`, plus `"skipped":
reason` for an image that could not be used. Output formats turn entries into files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, TypedDict

from ovsam_model.io.datasets import ImageRecord
from ovsam_model.io.detections import PromptRecord

if TYPE_CHECKING:
    from ovsam_model.types import Prediction

LABEL_SOURCES = ("ovsam", "detector")


class ImageInfo(TypedDict):
    id: int
    file_name: str
    height: int
    width: int


class Entry(TypedDict, total=False):
    image: ImageInfo
    records: list[dict]
    skipped: str


def _r(value: float, digits: int) -> float:
    return round(float(value), digits)


def prompt_xywh(prompt: PromptRecord) -> list[float]:
    """The prompt's box (or its clicks' bounding box) as COCO XYWH."""
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
    else:
        xs = [p[0] for p in prompt.points or ()]
        ys = [p[1] for p in prompt.points or ()]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return [_r(x1, 3), _r(y1, 3), _r(x2 - x1, 3), _r(y2 - y1, 3)]


def image_info(image: ImageRecord) -> ImageInfo:
    return {"id": image.id, "file_name": image.file_name, "height": image.height, "width": image.width}


def labeled_entry(image: ImageRecord, records: list[dict]) -> Entry:
    return {"image": image_info(image), "records": records}


def skipped_entry(image: ImageRecord, reason: str) -> Entry:
    """The entry of an image that was not labeled: done, no records, and why (a `SkipReason`)."""
    return {"image": image_info(image), "records": [], "skipped": str(reason)}


def _rles(prediction: "Prediction") -> list[dict]:
    if prediction.rles is not None:
        return prediction.rles
    from ovsam_model.io.masks import encode_rle

    return encode_rle(prediction.masks)


def build_records(
    image: ImageRecord,
    prompts: Sequence[PromptRecord],
    prediction: "Prediction",
    *,
    category_ids: Sequence[int],
    label_source: str = "ovsam",
) -> list[dict]:
    """One record per prompt (same order). `category_ids[label]` maps vocabulary index → id.

    `prediction` is an `ovsam_model.types.Prediction`, with masks already encoded as RLE
    (`rles`) or as bool masks."""
    from ovsam_model.io.masks import rle_area, rle_bbox

    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
    if len(prediction) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prediction)} predictions for image {image.id}")
    rles = _rles(prediction)
    if rles and any(list(rle["size"]) != [image.height, image.width] for rle in rles):
        raise ValueError(f"image {image.id}: masks of size {rles[0]['size']} != image {[image.height, image.width]}")
    if prediction.mask_areas is not None and prediction.mask_boxes is not None:
        areas, boxes = prediction.mask_areas, prediction.mask_boxes  # measured where the masks were made
    else:
        areas, boxes = rle_area(rles), rle_bbox(rles)
    labels = prediction.labels.tolist()
    probs = prediction.scores.tolist()
    topk_labels, topk_probs = prediction.topk_labels.tolist(), prediction.topk_scores.tolist()
    out = []
    for i, prompt in enumerate(prompts):
        if label_source == "ovsam":
            category, score = int(category_ids[labels[i]]), prompt.score * probs[i]
        else:
            category, score = prompt.category_id, prompt.score
        out.append(
            {
                "image_id": image.id,
                "category_id": category,
                "score": _r(score, 6),
                "bbox": [_r(v, 3) for v in boxes[i]] if areas[i] > 0 else prompt_xywh(prompt),
                "segmentation": rles[i],
                "area": areas[i],
                "detector_score": _r(prompt.score, 6),
                "detector_category_id": prompt.category_id,
                "topk": [
                    {"category_id": int(category_ids[l]), "prob": _r(p, 6)} for l, p in zip(topk_labels[i], topk_probs[i])
                ],
            }
        )
    return out
