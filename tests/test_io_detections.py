"""Readers of detector / click files and the per-record checks."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from ovsam_model.io.detections import (
    InputError,
    SkipReason,
    prompts_for,
    read_box_records,
    read_point_records,
    select_prompts,
)

RECS = [
    {"image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "score": 0.9},
    {"image_id": 2, "category_id": 5, "bbox": [0, 0, 5, 5], "score": 0.5},
]


def _select(records, sizes=None, **kw):
    sizes = sizes or {1: (100, 200), 2: (50, 50)}
    return select_prompts(records, image_size=sizes.get, missing_reason=lambda i: SkipReason.IMAGE_NOT_IN_ANN, **kw)


def test_json_array_jsonl_and_stdin_agree(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(RECS, indent=2))
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECS) + "\n\n")
    a = read_box_records(arr)
    b = read_box_records(lines)
    c = read_box_records("-", stdin=io.StringIO(json.dumps(RECS)))
    assert a == b == c
    assert [r.bbox for r in a] == [(10, 20, 30, 40), (0, 0, 5, 5)]
    assert [r.index for r in a] == [0, 1] and a[1].category_id == 5 and not a[0].contiguous


def test_empty_inputs(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    (tmp_path / "e.jsonl").write_text("")
    assert read_box_records(tmp_path / "e.json") == [] == read_box_records(tmp_path / "e.jsonl")


def test_malformed_json_says_where(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"image_id": 1,\n  "bbox": [1, 2, 3 4]}\n]')
    with pytest.raises(InputError, match=r"line 3 column 20"):
        read_box_records(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text(json.dumps(RECS[0]) + "\n" + '{"image_id": 2,' + "\n")
    with pytest.raises(InputError, match=r"line 2 column"):
        read_box_records(bad_lines)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"annotations": RECS}, indent=1))
    with pytest.raises(InputError, match="JSON object"):
        read_box_records(obj)


def test_missing_field_and_wrong_types(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([RECS[0], {"image_id": 2, "score": 0.3}]))
    with pytest.raises(InputError, match=r"record 1: missing field 'bbox'"):
        read_box_records(path)
    path.write_text(json.dumps([{"image_id": 2, "bbox": [1, 2, 3], "score": 0.3}]))
    with pytest.raises(InputError, match=r"record 0: field 'bbox'"):
        read_box_records(path)
    path.write_text(json.dumps([{"image_id": 2, "bbox": [1, 2, 3, 4], "score": 0.3}]))
    assert read_box_records(path)[0].category_id is None
    with pytest.raises(InputError, match="missing field 'category_id'"):
        read_box_records(path, require_category=True)
    with pytest.raises(InputError, match="file not found"):
        read_box_records(tmp_path / "nope.json")


def test_detectron2_pth_layout(tmp_path):
    # detectron2 COCOEvaluator: [{"image_id", "instances": [{image_id, category_id 0-based, bbox XYWH, score}]}]
    preds = [
        {"image_id": 1, "instances": [{"image_id": 1, "category_id": 0, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.7},
                                      {"image_id": 1, "category_id": 2, "bbox": [5.0, 5.0, 3.0, 4.0], "score": 0.6}]},
        {"image_id": 2, "instances": [{"image_id": 2, "category_id": 9, "bbox": [1.0, 1.0, 3.0, 4.0], "score": 0.5}]},
    ]
    path = tmp_path / "instances_predictions.pth"
    torch.save(preds, path)
    recs = read_box_records(path)
    assert [r.category_id for r in recs] == [0, 2, 9] and all(r.contiguous for r in recs)
    kept = _select(recs, category_ids=[90, 1, 18])  # sorted dataset ids: [1, 18, 90]
    assert [p.category_id for p in kept.by_image[1]] == [1, 90]
    assert kept.skipped == {SkipReason.UNKNOWN_CATEGORY: 1}


def test_per_record_skips_and_clipping():
    recs = read_box_records("-", stdin=io.StringIO(json.dumps([
        {"image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "score": 0.9},          # kept
        {"image_id": 1, "category_id": 3, "bbox": [10, 20, 0, 40], "score": 0.9},           # zero width
        {"image_id": 1, "category_id": 3, "bbox": [-5, 90, 20, 30], "score": 0.9},          # clipped
        {"image_id": 1, "category_id": 3, "bbox": [300, 10, 20, 30], "score": 0.9},         # outside
        {"image_id": 1, "category_id": 77, "bbox": [1, 1, 2, 2], "score": 0.9},             # unknown category
        {"image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2], "score": 0.9},              # image not in --ann
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "score": float("nan")},     # NaN
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, float("inf"), 2], "score": 0.2},   # inf
    ])))
    kept = _select(recs, category_ids=[3, 5])
    assert [p.index for p in kept.by_image[1]] == [0, 2]
    assert kept.by_image[1][0].box == (10, 20, 40, 60)
    assert kept.by_image[1][1].box == (0, 90, 15, 100)  # XYXY clipped to the 200x100 image
    assert kept.clipped == 1
    assert kept.skipped == {
        SkipReason.NON_POSITIVE: 1, SkipReason.OUTSIDE: 1, SkipReason.UNKNOWN_CATEGORY: 1,
        SkipReason.IMAGE_NOT_IN_ANN: 1, SkipReason.NON_FINITE: 2,
    }
    assert kept.total == 8 and kept.num_prompts == 2
    assert _select(recs, category_ids=[3, 5], check_categories=False).num_prompts == 3


def test_score_thr_and_max_dets_keep_input_order():
    scores = [0.1, 0.9, 0.5, 0.7, 0.5, 0.05]
    recs = read_box_records("-", stdin=io.StringIO(json.dumps(
        [{"image_id": 1, "category_id": 3, "bbox": [i, i, 5, 5], "score": s} for i, s in enumerate(scores)])))
    kept = _select(recs, score_thr=0.1, max_dets=3)
    # >= 0.1: indices 0..4; top 3 by score (ties → earlier): 1 (0.9), 3 (0.7), 2 (0.5)
    assert [p.index for p in kept.by_image[1]] == [1, 2, 3]
    assert kept.skipped == {SkipReason.BELOW_SCORE_THR: 1, SkipReason.OVER_MAX_DETS: 2}


def test_points_records_and_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": 1, "points": [[10, 10], [20, 30]], "labels": [1, 0]},
        {"image_id": 1, "points": [[50, 60]], "labels": [1], "score": 0.5},
        {"image_id": 1, "points": [[500, 60]], "labels": [1]},
    ]))
    recs = read_point_records(path)
    kept = _select(recs)
    assert kept.skipped == {SkipReason.POINT_OUTSIDE: 1}
    prompts = prompts_for(kept.by_image[1])
    assert prompts.boxes is None and tuple(prompts.points.shape) == (2, 2, 2)
    assert prompts.point_labels.tolist() == [[1, 0], [1, -1]]  # -1 pads (SAM's "not a point")
    assert prompts.points[1, 0].tolist() == [50, 60]
    path.write_text(json.dumps([{"image_id": 1, "points": [[1, 2]], "labels": [2]}]))
    with pytest.raises(InputError, match="'labels'"):
        read_point_records(path)
    path.write_text(json.dumps([{"image_id": 1, "points": [], "labels": []}]))
    with pytest.raises(InputError, match="'points'"):
        read_point_records(path)


def test_box_prompts_are_xyxy():
    recs = read_box_records("-", stdin=io.StringIO(json.dumps(RECS)))
    kept = _select(recs)
    p = prompts_for(kept.by_image[1])
    assert p.boxes.tolist() == [[10, 20, 40, 60]] and p.points is None
    assert not math.isnan(kept.by_image[2][0].score)


def test_a_dataset_json_given_as_boxes_says_so(data_dir, tmp_path):
    """The likeliest mix-up: the one-line COCO dataset JSON passed as --boxes."""
    from ovsam_model.io.detections import InputError, read_box_records

    ann = data_dir / "coco-val2017-mini" / "instances.json"
    with pytest.raises(InputError, match="dataset JSON"):
        read_box_records(ann)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(ann.read_text()), indent=1))
    with pytest.raises(InputError, match="dataset JSON"):
        read_box_records(pretty)


def test_unreadable_pth_gives_no_unsafe_advice(tmp_path):
    from ovsam_model.io.detections import InputError, read_box_records

    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(InputError) as info:
        read_box_records(bad)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
