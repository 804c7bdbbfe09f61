"""Inputs of `ovsam label` / `label_images` found to fail badly in an audit: each must either work
or be refused in one line (an `InputError`, exit code 2), never with a traceback or lost data."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

import ovsam_model.labeling.api as api_mod
from ovsam_model.io.detections import InputError, SkipReason, read_box_records, read_point_records, select_prompts
from ovsam_model.io.json_files import read_json
from ovsam_model.labeling.sources import make_source

from test_cli_label import cached_model, mini, run  # noqa: F401  (fixtures: the cached tiny models, the mini-val data)

RECS = [{"image_id": 1, "bbox": [10, 20, 30, 40], "score": 0.9}, {"image_id": 2, "bbox": [0, 0, 5, 5], "score": 0.5}]
BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_is_read_past_in_prompt_files_stdin_and_ann(tmp_path):
    """Windows tools (PowerShell's Out-File, Notepad) start UTF-8 files with a BOM."""
    (tmp_path / "a.json").write_bytes(BOM + json.dumps(RECS).encode())
    (tmp_path / "a.jsonl").write_bytes(BOM + b"".join(json.dumps(r).encode() + b"\r\n" for r in RECS))
    (tmp_path / "p.json").write_bytes(BOM + b'[{"image_id": 1, "points": [[1, 2]], "labels": [1]}]')
    expected = read_box_records(tmp_path / "a.json")
    assert [r.bbox for r in expected] == [(10, 20, 30, 40), (0, 0, 5, 5)]
    assert read_box_records(tmp_path / "a.jsonl") == expected
    assert read_box_records("-", stdin=io.StringIO("\ufeff" + json.dumps(RECS))) == expected
    assert read_point_records(tmp_path / "p.json")[0].points == ((1.0, 2.0),)
    (tmp_path / "ann.json").write_bytes(BOM + b'{"images": [], "annotations": [], "categories": []}')
    assert read_json(tmp_path / "ann.json", "--ann ann.json")["images"] == []


def test_integers_too_large_for_a_float_are_skipped_as_non_finite(tmp_path):
    """JSON allows any number of digits; float() of such an integer raised OverflowError."""
    huge = "9" * 400
    (tmp_path / "b.json").write_text(f'[{{"image_id": 1, "bbox": [1, 1, {huge}, 3], "score": 0.5}},'
                                     f' {{"image_id": 1, "bbox": [1, 1, 2, 3], "score": -{huge}}}]')
    (tmp_path / "p.json").write_text(f'[{{"image_id": 1, "points": [[1, {huge}]], "labels": [1]}}]')
    raw = read_box_records(tmp_path / "b.json") + read_point_records(tmp_path / "p.json")
    kept = select_prompts(raw, image_size=lambda i: (100, 100), missing_reason=lambda i: "", category_ids=None)
    assert kept.skipped == {SkipReason.NON_FINITE: 3} and kept.num_prompts == 0


def test_json_nested_too_deeply_is_one_line(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        read_box_records(tmp_path / "deep.json")
    with pytest.raises(InputError, match="nested too deeply"):
        read_json(tmp_path / "deep.json", "--ann deep.json")


def test_records_given_in_python_numpy_values_and_wrong_types():
    """Detector code hands over numpy scores and boxes; a single dict or a number is a mistake."""
    source = make_source("boxes", [{"image_id": np.int64(1), "bbox": np.array([10, 20, 30, 40], np.float32),
                                    "score": np.float32(0.5)}])
    assert source.read() == {1}
    generator = make_source("boxes", (r for r in RECS))
    assert generator.read() == generator.read(strict=True) == {1, 2}  # a generator is read once
    with pytest.raises(InputError, match="single dict"):
        make_source("boxes", RECS[0]).read()
    with pytest.raises(InputError, match="not int"):
        make_source("points", 42).read()


def test_out_that_is_a_folder_is_refused_before_any_image_is_labeled(mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    monkeypatch.setattr(api_mod, "load_predictor", lambda *a, **k: pytest.fail("the model was built"))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        api_mod.label_images(root / "images", boxes=boxes, ann=root / "instances.json", out=tmp_path / "out",
                             model="tiny", workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no part file, no temp file


def test_out_that_is_an_input_file_is_refused(mini, tmp_path):
    root, gt, ids, boxes = mini
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(boxes[:2]))
    r = run("--boxes", dets, "--images", root / "images", "--ann", root / "instances.json", "--out", dets)
    assert r.exit_code == 2 and "is the --boxes input file" in r.output and "Traceback" not in r.output
    assert json.loads(dets.read_text()) == boxes[:2]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(gt))
    with pytest.raises(InputError, match="is the ann= input file"):
        api_mod.label_images(root / "images", boxes=boxes[:2], ann=ann, out=ann, model="tiny", device="cpu", workers=0)
    assert json.loads(ann.read_text()) == gt


def test_a_nan_score_threshold_and_a_resume_without_an_output_file_are_refused(mini, monkeypatch):
    root, gt, ids, boxes = mini
    with pytest.raises(InputError, match="must be a number, not nan"):
        make_source("boxes", boxes, score_thr=float("nan"))  # it would filter nothing
    r = run("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", "--score-thr", "nan",
            "--out", "-", input=json.dumps(boxes[:2]))
    assert r.exit_code == 2 and "--score-thr" in r.output and "Traceback" not in r.output
    stub = SimpleNamespace(category_ids=[c["id"] for c in gt["categories"]], class_names=[c["name"] for c in gt["categories"]],
                           weights_sha256={}, prepare=lambda image: pytest.fail("an image was labeled"))
    monkeypatch.setattr(api_mod, "load_predictor", lambda *a, **k: stub)
    with pytest.raises(InputError, match="resume needs an output file"):
        api_mod.label_images(root / "images", boxes=boxes[:2], ann=root / "instances.json", resume=True,
                             model="tiny", workers=0)


def test_prompts_from_stdin_on_a_terminal_are_refused_not_waited_for(mini, tmp_path, monkeypatch):
    import ovsam_cli.label as label_mod

    root, gt, ids, boxes = mini
    monkeypatch.setattr(label_mod, "_stdin_is_terminal", lambda: True)
    for option in ("--boxes", "--points"):
        r = run(option, "-", "--images", root / "images", "--out", tmp_path / "o.json")
        assert r.exit_code == 2 and f"{option} - reads standard input, which is this terminal" in r.output
    dets = tmp_path / "dets.json"  # a file is read as usual
    dets.write_text(json.dumps(boxes[:1]))
    r = run("--boxes", dets, "--images", root / "images", "--ann", root / "instances.json", "--out", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
