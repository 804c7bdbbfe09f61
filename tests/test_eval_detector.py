"""Detector protocol: AP from evaluate_detections equals pycocotools / LVIS called directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam_model.eval.detector import evaluate_detections, lvis_numpy_compat
from ovsam_model.splits import coco_split_ids

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SAMPLE = DATA / "coco-detections-sample"
MINI = DATA / "coco-val2017-mini" / "instances.json"
SAMPLE_GT = SAMPLE / "instances_val2017_subset_139_802.json"
needs_sample = pytest.mark.skipif(not SAMPLE_GT.is_file(), reason=f"test data absent: {SAMPLE}")
needs_mini = pytest.mark.skipif(not MINI.is_file(), reason=f"test data absent: {MINI}")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _sample_preds(kind: str) -> list[dict]:
    preds = json.loads((SAMPLE / f"instances_val2014_fake{kind}100_results.json").read_text())
    return [p for p in preds if p["image_id"] in (139, 802)]


def _reference_coco(gt_path: Path, preds: list[dict], iou_type: str, cat_ids=None) -> np.ndarray:
    """pycocotools called directly, detectron2-style (bbox dropped for segm)."""
    preds = copy.deepcopy(preds)
    if iou_type == "segm":
        for p in preds:
            p.pop("bbox", None)
    gt = _quiet(COCO, str(gt_path))
    dt = _quiet(gt.loadRes, preds)
    ev = COCOeval(gt, dt, iou_type)
    if cat_ids is not None:
        ev.params.catIds = sorted(cat_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return ev.stats


@needs_sample
@pytest.mark.parametrize("iou_type,kind,expected", [("segm", "segm", 0.465), ("bbox", "bbox", 0.536)])
def test_sample_matches_pycocotools(iou_type, kind, expected):
    preds = _sample_preds(kind)
    res = evaluate_detections(SAMPLE_GT, preds, dataset="coco", iou_type=iou_type, split="all")
    ref = _reference_coco(SAMPLE_GT, preds, iou_type)
    for i, key in enumerate(COCO_KEYS):
        assert res.metrics[key] == pytest.approx(ref[i], abs=1e-12), key
    assert res.metrics["AP"] == pytest.approx(expected, abs=5e-4)
    assert res.num_predictions == len(preds)


@needs_sample
def test_path_inputs_accepted(tmp_path):
    preds = _sample_preds("segm")
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(preds))
    from_path = evaluate_detections(Path(SAMPLE_GT), Path(pred_file), iou_type="segm")
    from_objects = evaluate_detections(json.loads(SAMPLE_GT.read_text()), preds, iou_type="segm")
    assert from_path.metrics == from_objects.metrics


def _gt_as_predictions(gt: dict, shift: tuple[int, int] = (0, 0), seed: int = 0) -> list[dict]:
    """Non-crowd GT masks as results (RLE, no bbox), each shifted by (dx, dy) pixels with zero fill."""
    coco = _quiet(COCO)
    coco.dataset = copy.deepcopy(gt)
    _quiet(coco.createIndex)
    rng = np.random.default_rng(seed)
    dx, dy = shift
    out = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        m = coco.annToMask(ann)
        shifted = np.zeros_like(m)
        h, w = m.shape
        shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            m[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        rle = mask_utils.encode(np.asfortranarray(shifted))
        rle["counts"] = rle["counts"].decode("ascii")
        score = 1.0 if shift == (0, 0) else float(rng.uniform(0.05, 1.0))
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": score,
                    "segmentation": rle})
    return out


@needs_mini
def test_gt_as_predictions_gives_ap_one():
    gt = json.loads(MINI.read_text())
    res = evaluate_detections(gt, _gt_as_predictions(gt), iou_type="segm")
    assert res.metrics["AP"] == pytest.approx(1.0)
    assert res.metrics["AP50"] == pytest.approx(1.0)
    assert res.metrics["AP75"] == pytest.approx(1.0)


@needs_mini
def test_shifted_masks_match_pycocotools():
    gt = json.loads(MINI.read_text())
    preds = _gt_as_predictions(gt, shift=(3, -2), seed=1)
    res = evaluate_detections(gt, preds, iou_type="segm")
    ref = _reference_coco(MINI, preds, "segm")
    for i, key in enumerate(COCO_KEYS):
        assert res.metrics[key] == pytest.approx(ref[i], abs=1e-12), key
    assert 0.05 < res.metrics["AP"] < 0.95


@needs_mini
def test_ov_split_equals_restricted_cocoeval():
    """AP over 65 classes / base / novel equal separate COCOeval runs restricted to those ids."""
    gt = json.loads(MINI.read_text())
    preds = _gt_as_predictions(gt, shift=(2, 2), seed=2)
    res = evaluate_detections(gt, preds, iou_type="segm", split="ov")
    base, novel = coco_split_ids(gt["categories"])
    ov = _reference_coco(MINI, preds, "segm", cat_ids=base + novel)
    for i, key in enumerate(COCO_KEYS):
        assert res.metrics[key] == pytest.approx(ov[i], abs=1e-12), key
    assert res.metrics["AP_base"] == pytest.approx(_reference_coco(MINI, preds, "segm", cat_ids=base)[0], abs=1e-12)
    assert res.metrics["AP_novel"] == pytest.approx(_reference_coco(MINI, preds, "segm", cat_ids=novel)[0], abs=1e-12)
    assert res.num_categories == 65
    assert any("65" in n for n in res.notes)
    all_split = evaluate_detections(gt, preds, iou_type="segm", split="all")
    assert all_split.metrics["AP"] != res.metrics["AP"]  # the 15 other classes are present in the mini GT


@needs_mini
@pytest.mark.parametrize("dataset", ["coco", "lvis"])
def test_empty_predictions(dataset):
    gt = json.loads(MINI.read_text()) if dataset == "coco" else _lvis_gt()
    res = evaluate_detections(gt, [], dataset=dataset, iou_type="segm")
    assert res.metrics["AP"] == 0.0
    assert all(v in (0.0, -1.0) for v in res.metrics.values())
    assert res.num_predictions == 0


@needs_sample
def test_ids_not_in_gt():
    preds = _sample_preds("segm")
    bad_img = copy.deepcopy(preds[:3]) + [dict(preds[0], image_id=987654)]
    with pytest.raises(ValueError, match="image ids.*987654"):
        evaluate_detections(SAMPLE_GT, bad_img)
    bad_cat = copy.deepcopy(preds[:3]) + [dict(preds[0], category_id=12)]  # 12 is a gap in COCO ids
    with pytest.raises(ValueError, match="category ids.*12"):
        evaluate_detections(SAMPLE_GT, bad_cat)


@needs_sample
def test_segm_needs_segmentation_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_detections(SAMPLE_GT, _sample_preds("bbox"), iou_type="segm")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate_detections(SAMPLE_GT, broken)
    with pytest.raises(FileNotFoundError):
        evaluate_detections(SAMPLE_GT, tmp_path / "missing.json")


@needs_mini
@pytest.mark.parametrize("dataset", ["coco", "lvis"])
def test_inputs_not_mutated(dataset):
    gt = json.loads(MINI.read_text()) if dataset == "coco" else _lvis_gt()
    preds = _gt_as_predictions(gt, shift=(1, 1))
    for p in preds[::2]:  # half of them carry a bbox, which segm evaluation must drop on its copy
        p["bbox"] = mask_utils.toBbox(p["segmentation"]).tolist()
    gt_before, preds_before = copy.deepcopy(gt), copy.deepcopy(preds)
    evaluate_detections(gt, preds, dataset=dataset, iou_type="segm")
    evaluate_detections(gt, preds[::2], dataset=dataset, iou_type="bbox")
    assert gt == gt_before
    assert preds == preds_before


def _lvis_gt() -> dict:
    """LVIS-style GT from the COCO mini GT: no crowd, frequency r/c/f, negative / not-exhaustive lists."""
    gt = json.loads(MINI.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    for i, c in enumerate(gt["categories"]):
        c["frequency"] = "rcf"[i % 3]
    present: dict[int, set] = {}
    for a in gt["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    cat_ids = [c["id"] for c in gt["categories"]]
    for k, img in enumerate(gt["images"]):
        absent = [c for c in cat_ids if c not in present.get(img["id"], set())]
        img["neg_category_ids"] = absent[k % 5::7]
        img["not_exhaustive_category_ids"] = sorted(present.get(img["id"], set()))[:1] if k % 4 == 0 else []
        assert img["coco_url"].split("/")[-2] == "val2017"
    return gt


@needs_mini
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_lvis_matches_lvis_eval(tmp_path, iou_type):
    from lvis import LVISEval

    gt = _lvis_gt()
    preds = _gt_as_predictions(gt, shift=(2, -3), seed=3)
    # false positives of a negative category and of a category LVIS must ignore on that image
    img0 = gt["images"][0]
    fp = dict(preds[0], image_id=img0["id"], score=0.9)
    extra = []
    if img0["neg_category_ids"]:
        extra.append(dict(fp, category_id=img0["neg_category_ids"][0]))
    preds = preds + extra
    for p in preds:
        p["bbox"] = mask_utils.toBbox(p["segmentation"]).tolist()
    gt_file = tmp_path / "lvis_gt.json"
    gt_file.write_text(json.dumps(gt))
    ref_preds = copy.deepcopy(preds)
    if iou_type == "segm":
        for p in ref_preds:
            p.pop("bbox")
    ref = LVISEval(str(gt_file), ref_preds, iou_type)
    with lvis_numpy_compat():  # lvis 0.5.3 needs np.float
        ref.run()
    res = evaluate_detections(gt, preds, dataset="lvis", iou_type=iou_type)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert res.metrics[key] == pytest.approx(ref.get_results()[key], abs=1e-12), key
    assert 0.0 < res.metrics["AP"] < 1.0
    assert all(res.metrics[k] > -1 for k in ("APr", "APc", "APf"))


@needs_mini
def test_lvis_requires_lvis_fields():
    gt = json.loads(MINI.read_text())
    with pytest.raises(ValueError, match="frequency"):
        evaluate_detections(gt, [], dataset="lvis")


def test_predictions_as_json_lines(tmp_path):
    from ovsam_model.eval.detector import load_predictions

    recs = [{"image_id": 1, "category_id": 2, "score": 0.5, "bbox": [0, 0, 1, 1]},
            {"image_id": 3, "category_id": 4, "score": 0.25, "bbox": [1, 1, 2, 2]}]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert load_predictions(path) == recs
    path.write_text(json.dumps(recs[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="line 2"):
        load_predictions(path)
