"""Detector protocol (paper Tab. 2-4): COCO / LVIS AP of a COCO results array.

Done the way reference evaluators (detectron2) do it:
- inputs are never mutated (loadRes, LVISResults and COCOeval all write into what they get, so
  they get deep copies);
- for `segm`, `bbox` is removed from every prediction so that areas (small/medium/large) come
  from the masks, not the boxes;
- an empty prediction list is evaluated against an empty result set (pycocotools/LVIS would
  crash on it): categories with ground truth get AP 0, and -1 stays where the evaluator says
  "undefined" (e.g. APs without small ground truth);
- prediction image ids and category ids must belong to the ground truth (ValueError otherwise).

With `split="ov"` (COCO only) AP_base / AP_novel are computed, as the OV detection papers do,
from the same COCOeval run's `eval["precision"]` restricted to the 48 / 17 category indices; the
15 other classes are left out, and the overall AP/AP50/... are then over the 65 classes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import json
import os
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam_model.eval.report import DetectorResult, read_json
from ovsam_model.splits import coco_split_ids

Dataset = Literal["coco", "lvis"]
IouType = Literal["segm", "bbox"]
Split = Literal["ov", "all"]

LVIS_MAX_DETS = 300


def load_ground_truth(gt: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A COCO-format dataset dict from a path (read) or a dict (returned as is, never mutated here)."""
    data = gt if isinstance(gt, Mapping) else read_json(gt, "ground-truth file")
    if not isinstance(data, Mapping) or not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError("ground truth must be a COCO dataset JSON with 'images', 'annotations' and 'categories'")
    return data  # type: ignore[return-value]


PREDICTION_FIELDS = ("image_id", "category_id", "score")


def load_predictions(
    predictions: str | os.PathLike | Sequence[Mapping[str, Any]],
    required: Sequence[str] = PREDICTION_FIELDS,
) -> list[dict[str, Any]]:
    """A COCO results array (JSON array or JSON Lines) from a path, or a list; a dataset JSON's
    `annotations` is accepted too. Every record must have the `required` fields."""
    data = predictions if isinstance(predictions, Sequence) and not isinstance(predictions, (str, bytes)) \
        else _read_json_or_lines(predictions)
    dataset = isinstance(data, Mapping) and isinstance(data.get("annotations"), list)
    if dataset:
        data = data["annotations"]
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise ValueError("predictions must be a JSON array of COCO results")
    for i, p in enumerate(data):
        if not isinstance(p, Mapping):
            raise ValueError(f"prediction #{i} is not an object")
        missing = [k for k in required if k not in p]
        if missing:
            hint = " (a dataset JSON: its annotations have no scores; give a results file)" if dataset else ""
            raise ValueError(f"prediction #{i} lacks {', '.join(missing)}{hint}")
        _check_field_types(p, i, required)
    return list(data)  # type: ignore[arg-type]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field_types(p: Mapping[str, Any], i: int, required: Sequence[str]) -> None:
    """ValueError naming the record when a required id is not an integer or the score not a finite
    number (pycocotools would fail deep inside, or rank a NaN score anywhere)."""
    for key in ("image_id", "category_id"):
        if key in required and not (_is_number(p[key]) and float(p[key]).is_integer()):
            raise ValueError(f"prediction #{i}: '{key}' must be an integer, not {p[key]!r}")
    if "score" in required and not (_is_number(p["score"]) and np.isfinite(p["score"])):
        raise ValueError(f"prediction #{i}: 'score' must be a finite number, not {p['score']!r}")


def _read_json_or_lines(path: str | os.PathLike) -> Any:
    """A JSON document, or JSON Lines of records (what `ovsam label --boxes` accepts too)."""
    try:
        return read_json(path, "prediction file")
    except ValueError as whole_error:
        if "Extra data" not in str(whole_error):
            raise
        records = []
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"prediction file {path}: line {lineno} is not valid JSON: {e.msg}") from None
        return records


def _first_few(values: Iterable[Any], n: int = 5) -> str:
    """The first `n` distinct values in order (numbers numerically: #2 before #10), then how many more."""
    vals = sorted(set(values), key=lambda v: (0, v, "") if _is_number(v) else (1, 0, str(v)))
    shown = ", ".join(str(v) for v in vals[:n])
    return shown + (f" (and {len(vals) - n} more)" if len(vals) > n else "")


def check_ids(gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], *, categories: bool = True) -> None:
    """ValueError naming (the first few) prediction image ids (and, with `categories`, category
    ids) absent from the GT."""
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    bad_imgs = [p["image_id"] for p in predictions if p["image_id"] not in img_ids]
    if bad_imgs:
        raise ValueError(f"prediction image ids not in the ground truth: {_first_few(bad_imgs)}")
    if not categories:
        return
    bad_cats = [p["category_id"] for p in predictions if p["category_id"] not in cat_ids]
    if bad_cats:
        raise ValueError(f"prediction category ids not in the ground truth: {_first_few(bad_cats)}")


def prepare_predictions(
    gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], iou_type: IouType
) -> list[dict[str, Any]]:
    """Deep copies ready for loadRes / LVISResults: segm → compressed RLE without `bbox`."""
    out = copy.deepcopy(list(predictions))
    if iou_type == "bbox":
        bad = [i for i, p in enumerate(out) if not (isinstance(p.get("bbox"), (list, tuple)) and len(p["bbox"]) == 4)]
        if bad:
            raise ValueError(f"bbox evaluation needs 'bbox' [x, y, w, h] in every prediction; missing in #{_first_few(bad)}")
        return out
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    missing = [i for i, p in enumerate(out) if not p.get("segmentation")]
    if missing:
        raise ValueError(
            f"segm evaluation needs 'segmentation' in every prediction; missing in #{_first_few(missing)} "
            "(use --iou-type bbox for box-only results)"
        )
    wrong_size = []
    for i, p in enumerate(out):
        p.pop("bbox", None)  # so loadRes takes the area from the mask
        h, w = sizes[p["image_id"]]
        seg = _compressed_rle(p["segmentation"], h, w, i)
        if [int(v) for v in seg["size"]] != [h, w]:
            wrong_size.append(p["image_id"])
        p["segmentation"] = seg
    if wrong_size:
        raise ValueError(f"mask size differs from the ground-truth image size for image ids {_first_few(wrong_size)}")
    return out


def _compressed_rle(seg: Any, h: int, w: int, i: int) -> dict[str, Any]:
    """Prediction #i's segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE
    with str counts; ValueError naming the record when it is none of these."""
    bad = ValueError(f"prediction #{i}: 'segmentation' is neither polygons [[x, y, ...], ...] nor an RLE "
                     "{size: [h, w], counts}")
    if isinstance(seg, list):
        if not all(isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_is_number, poly))
                   for poly in seg):
            raise bad
        rles = mask_utils.frPyObjects(seg, h, w)
        return _str_counts(mask_utils.merge(rles))
    if not isinstance(seg, Mapping):
        raise bad
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_number(v) for v in size)):
        raise bad
    if isinstance(counts, list):  # uncompressed RLE
        if not all(_is_number(c) for c in counts):
            raise bad
        return _str_counts(mask_utils.frPyObjects(dict(seg), h, w))
    if not isinstance(counts, (str, bytes)):
        raise bad
    return _str_counts({"size": list(size), "counts": counts})


def _str_counts(rle: Mapping[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _summarize_ap(
    ev: COCOeval,
    k_indices: Sequence[int],
    iou_thr: float | None = None,
    area: str = "all",
    max_dets: int = 100,
) -> float:
    """pycocotools' AP summary restricted to category indices (mean over precision > -1, else -1)."""
    p = ev.params
    s = ev.eval["precision"]  # [T, R, K, A, M]
    if iou_thr is not None:
        s = s[np.where(np.isclose(p.iouThrs, iou_thr))[0]]
    s = s[:, :, list(k_indices)][:, :, :, p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _coco_metrics(ev: COCOeval, k_indices: Sequence[int]) -> dict[str, float]:
    return {
        "AP": _summarize_ap(ev, k_indices),
        "AP50": _summarize_ap(ev, k_indices, iou_thr=0.5),
        "AP75": _summarize_ap(ev, k_indices, iou_thr=0.75),
        "APs": _summarize_ap(ev, k_indices, area="small"),
        "APm": _summarize_ap(ev, k_indices, area="medium"),
        "APl": _summarize_ap(ev, k_indices, area="large"),
    }


def _coco_gt(gt: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dict(gt))  # COCOeval rewrites GT segmentations in place
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_coco_eval(
    gt: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    iou_type: IouType,
    *,
    use_cats: bool = True,
    max_dets: Sequence[int] | None = None,
) -> COCOeval:
    """COCOeval (evaluate + accumulate) on copies; predictions already prepared. pycocotools' prints are muted.

    `use_cats=False` and `max_dets` set `params.useCats` / `params.maxDets` (default: COCO's 1, 10, 100).
    """
    coco_gt = _coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if predictions:
            coco_dt = coco_gt.loadRes(list(predictions))
        else:  # loadRes crashes on []: an empty result set instead
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                               "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.useCats = int(use_cats)
        if max_dets is not None:
            ev.params.maxDets = sorted(int(m) for m in max_dets)
        ev.evaluate()
        ev.accumulate()
    return ev


def _lvis_from_dict(data: Mapping[str, Any]):
    """An `lvis.LVIS` built from a dict (its constructor only reads paths)."""
    from lvis import LVIS

    obj = LVIS.__new__(LVIS)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = copy.deepcopy(dict(data))  # LVISEval rewrites GT segmentations in place
    obj._create_index()
    return obj


def _check_lvis_fields(gt: Mapping[str, Any]) -> None:
    if any("frequency" not in c for c in gt["categories"]):
        raise ValueError("LVIS ground truth: every category needs 'frequency' (r/c/f)")
    lacking = [img["id"] for img in gt["images"]
               if "neg_category_ids" not in img or "not_exhaustive_category_ids" not in img]
    if lacking:
        raise ValueError(
            "LVIS ground truth: images need 'neg_category_ids' and 'not_exhaustive_category_ids'; "
            f"missing for image ids {_first_few(lacking)}"
        )


def _check_coco_fields(gt: Mapping[str, Any]) -> None:
    """COCOeval reads `iscrowd` of every GT annotation; LVIS files have none."""
    lacking = [i for i, a in enumerate(gt["annotations"]) if not isinstance(a, Mapping) or "iscrowd" not in a]
    if lacking:
        lvis = any(isinstance(c, Mapping) and "frequency" in c for c in gt["categories"])
        raise ValueError(f"COCO ground truth: annotations need 'iscrowd'; missing in #{_first_few(lacking)}"
                         + (" (an LVIS file: use --dataset lvis)" if lvis else ""))


@contextlib.contextmanager
def lvis_numpy_compat():
    """Let lvis 0.5.3 (the latest on PyPI) run on numpy >= 1.24.

    Its `LVISEval.accumulate` uses the removed alias `np.float` (fixed upstream in
    lvis-dataset/lvis-api#39, never released); the alias is put back for the duration only.
    """
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def run_lvis_eval(gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], iou_type: IouType):
    """LVISEval (run) on copies with the official 300 detections per image; returns the LVISEval."""
    from lvis import LVISEval, LVISResults

    _check_lvis_fields(gt)
    lvis_gt = _lvis_from_dict(gt)
    if predictions:
        lvis_dt = LVISResults(lvis_gt, list(predictions), max_dets=LVIS_MAX_DETS)
    else:  # LVISResults crashes on []: an empty result set instead
        lvis_dt = LVISResults.__new__(LVISResults)
        lvis_dt.logger = logging.getLogger("lvis.results")
        lvis_dt.dataset = {**copy.deepcopy(dict(gt)), "annotations": []}
        lvis_dt._create_index()
    ev = LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
    ev.params.max_dets = LVIS_MAX_DETS
    with lvis_numpy_compat():
        ev.run()
    return ev


def evaluate_detections(
    gt: str | os.PathLike | Mapping[str, Any],
    predictions: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    dataset: Dataset = "coco",
    iou_type: IouType = "segm",
    split: Split = "all",
) -> DetectorResult:
    """AP of a COCO results array against a COCO / LVIS ground truth (inputs are not modified).

    COCO: AP, AP50, AP75, APs, APm, APl (+ AP_base, AP_novel with split "ov", all over the
    48 + 17 classes). LVIS: the same plus APr, APc, APf (rare = novel; `split` does not change them).
    """
    if dataset not in ("coco", "lvis"):
        raise ValueError(f"dataset must be 'coco' or 'lvis', not {dataset!r}")
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    if split not in ("ov", "all"):
        raise ValueError(f"split must be 'ov' or 'all', not {split!r}")
    gt_data = load_ground_truth(gt)
    preds = load_predictions(predictions)
    check_ids(gt_data, preds)
    prepared = prepare_predictions(gt_data, preds, iou_type)
    notes: list[str] = []

    if dataset == "lvis":
        ev = run_lvis_eval(gt_data, prepared, iou_type)
        res = ev.get_results()
        metrics = {k: float(res[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
        notes.append(f"LVISEval, at most {LVIS_MAX_DETS} detections per image; novel = rare (APr)")
        num_cats = len(ev.params.cat_ids)
    else:
        _check_coco_fields(gt_data)
        ev = run_coco_eval(gt_data, prepared, iou_type)
        cat_index = {c: k for k, c in enumerate(ev.params.catIds)}
        notes.append("pycocotools COCOeval, at most 100 detections per image and category")
        if split == "ov":
            base_ids, novel_ids = coco_split_ids(gt_data["categories"])
            base_k = [cat_index[c] for c in base_ids]
            novel_k = [cat_index[c] for c in novel_ids]
            metrics = _coco_metrics(ev, base_k + novel_k)
            metrics["AP_base"] = _summarize_ap(ev, base_k)
            metrics["AP_novel"] = _summarize_ap(ev, novel_k)
            notes.append(
                "split ov: AP..APl are over the 65 OV classes (48 base + 17 novel); "
                "the 15 other COCO classes are left out"
            )
            num_cats = len(base_k) + len(novel_k)
        else:
            metrics = _coco_metrics(ev, range(len(ev.params.catIds)))
            num_cats = len(ev.params.catIds)
    notes.append("n/a (-1 in --json) = undefined (no ground truth in that group)")
    return DetectorResult(
        dataset=dataset,
        iou_type=iou_type,
        split=split,
        metrics=metrics,
        num_images=len(gt_data["images"]),
        num_predictions=len(preds),
        num_categories=num_cats,
        notes=notes,
    )
