"""Proposals protocol (class-agnostic AR, COCOeval useCats=0) against pycocotools run directly, on real COCO data."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from ovsam_cli.eval import eval_command
from ovsam_model.eval import evaluate_proposals

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MINI = DATA / "coco-val2017-mini" / "instances.json"
SAMPLE = DATA / "coco-detections-sample"
SAMPLE_GT = SAMPLE / "instances_val2017_subset_139_802.json"
pytestmark = pytest.mark.skipif(not (MINI.is_file() and SAMPLE_GT.is_file()), reason=f"test data absent: {DATA}")

AREA_KEYS = (("small", "ARs@1000"), ("medium", "ARm@1000"), ("large", "ARl@1000"))

app = typer.Typer(no_args_is_help=True)
app.command("eval")(eval_command)


@app.command("version")
def _version() -> None:  # a second command, so that `eval` is a real subcommand as in ovsam_cli.main
    """Print nothing."""


runner = CliRunner()


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _reference(gt_path: Path, preds: list[dict], iou_type: str = "segm") -> dict[str, float]:
    """pycocotools on its own: COCOeval with useCats=0, maxDets 1, 10, 100, 1000, read through
    summarize(), whose stats[6:12] are AR@maxDets[0..2] and ARs/ARm/ARl at maxDets[2]: one
    evaluate(), then accumulate() + summarize() with maxDets [1, 10, 100] and [10, 100, 1000]."""
    records = copy.deepcopy(preds)
    if iou_type == "segm":
        for p in records:
            p.pop("bbox", None)
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(records), iou_type)
        ev.params.useCats = 0
        ev.params.maxDets = [1, 10, 100, 1000]
        ev.evaluate()
        for max_dets in ([1, 10, 100], [10, 100, 1000]):
            ev.params.maxDets = max_dets
            ev.accumulate()
            ev.summarize()
            for i, m in enumerate(max_dets):
                out[f"AR@{m}"] = float(ev.stats[6 + i])
    out.update({key: float(ev.stats[9 + i]) for i, (_, key) in enumerate(AREA_KEYS)})
    return out


def _rle(seg: dict) -> dict:
    return {"size": [int(v) for v in seg["size"]], "counts": seg["counts"].decode("ascii")}


def _box_mask(x: float, y: float, w: float, h: float, height: int, width: int) -> dict:
    x2, y2 = min(x + w, width - 1.0), min(y + h, height - 1.0)
    x, y = max(x, 0.0), max(y, 0.0)
    return _rle(mask_utils.frPyObjects([[x, y, x2, y, x2, y2, x, y2]], height, width)[0])


@pytest.fixture(scope="module")
def noisy_proposals() -> list[dict]:
    """Per image of the mini set: 2 jittered boxes (as masks) per GT instance and random boxes,
    120 proposals per image with random scores, so that many good ones rank past 100."""
    rng = np.random.default_rng(0)
    coco = _load_coco(MINI)
    cat_ids = coco.getCatIds()
    preds = []
    for img in coco.dataset["images"]:
        h, w = img["height"], img["width"]
        props = []
        for a in coco.imgToAnns[img["id"]]:
            bx, by, bw, bh = a["bbox"]
            for _ in range(2):
                dx, dy, dw, dh = rng.normal(0, 0.12, 4) * [bw, bh, bw, bh]
                props.append((bx + dx, by + dy, max(bw + dw, 1.0), max(bh + dh, 1.0)))
        while len(props) < 120:
            x, y = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            props.append((x, y, rng.uniform(1, w - x), rng.uniform(1, h - y)))
        for box in props:
            seg = _box_mask(*box, h, w)
            preds.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                          "score": float(rng.uniform(0.01, 1.0)), "segmentation": seg,
                          "bbox": [float(v) for v in mask_utils.toBbox(seg)]})
    return preds


@pytest.fixture(scope="module")
def noisy_result(noisy_proposals):
    return evaluate_proposals(MINI, noisy_proposals)


def _gt_as_proposals(path: Path) -> list[dict]:
    coco = _load_coco(path)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "segmentation": _rle(coco.annToRLE(a))}
            for a in coco.dataset["annotations"] if not a["iscrowd"]]


def _sample_preds() -> list[dict]:
    preds = json.loads((SAMPLE / "instances_val2014_fakesegm100_results.json").read_text())
    return [p for p in preds if p["image_id"] in (139, 802)]


def _assert_metrics_equal(result: dict[str, float], reference: dict[str, float]) -> None:
    assert set(reference) <= set(result)
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_equals_pycocotools_use_cats_0_on_noisy_proposals(noisy_proposals, noisy_result):
    result = noisy_result
    ref = _reference(MINI, noisy_proposals)
    _assert_metrics_equal(result.metrics, ref)
    m = result.metrics
    assert list(m) == ["AR@1", "AR@10", "AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"]
    # the maxDets really differ: a wrong index into eval["recall"] cannot pass
    assert 0 < m["AR@1"] < m["AR@10"] < m["AR@100"] < m["AR@1000"] < 1
    assert result.max_dets == [1, 10, 100, 1000] and result.iou_type == "segm"
    assert result.num_predictions == len(noisy_proposals) == 120 * result.num_images
    assert result.num_instances == sum(not a["iscrowd"] for a in json.loads(MINI.read_text())["annotations"])

    box = evaluate_proposals(MINI, noisy_proposals, iou_type="bbox")
    _assert_metrics_equal(box.metrics, _reference(MINI, noisy_proposals, "bbox"))
    assert box.metrics["AR@1000"] != m["AR@1000"]


def test_equals_pycocotools_on_real_detector_masks():
    preds = _sample_preds()
    result = evaluate_proposals(SAMPLE_GT, preds)
    _assert_metrics_equal(result.metrics, _reference(SAMPLE_GT, preds))
    assert 0 < result.metrics["AR@100"] < 1


def test_category_ids_are_ignored_and_inputs_kept(noisy_proposals, noisy_result):
    """Proposals of any vocabulary (or none) are scored alike; pycocotools with useCats=0 alone
    would drop results whose category is not in the ground truth."""
    mixed = [dict(p, category_id=100_000 + i % 7) if i % 2 else {k: v for k, v in p.items() if k != "category_id"}
             for i, p in enumerate(noisy_proposals)]  # foreign category ids, or none
    before = copy.deepcopy(mixed)
    assert evaluate_proposals(MINI, mixed).metrics == noisy_result.metrics
    assert mixed == before  # not mutated: bbox and category ids kept


def test_gt_masks_as_proposals_have_recall_one():
    gt = json.loads(MINI.read_text())
    preds = _gt_as_proposals(MINI)
    metrics = evaluate_proposals(MINI, preds).metrics
    assert metrics["AR@100"] == metrics["AR@1000"] == 1.0
    areas = [a["area"] for a in gt["annotations"] if not a["iscrowd"]]
    has_gt = {"ARs@1000": min(areas) < 32 ** 2, "ARm@1000": any(32 ** 2 <= x < 96 ** 2 for x in areas),
              "ARl@1000": max(areas) >= 96 ** 2}
    assert all(has_gt.values())
    for key in has_gt:
        assert metrics[key] == 1.0, key
    assert metrics["AR@1"] < 1.0  # most images have several instances
    _assert_metrics_equal(metrics, _reference(MINI, preds))

    # LVIS-shaped ground truth: no `iscrowd` field, categories not used
    lvis_like = {**gt, "annotations": [{k: v for k, v in a.items() if k != "iscrowd"}
                                       for a in gt["annotations"] if not a["iscrowd"]]}
    lvis_metrics = evaluate_proposals(lvis_like, preds).metrics
    assert lvis_metrics["AR@1000"] == 1.0 and lvis_metrics == metrics


def test_empty_results_and_unknown_images():
    gt = json.loads(SAMPLE_GT.read_text())
    empty = evaluate_proposals(gt, [])
    assert empty.num_predictions == 0
    for key, value in empty.metrics.items():
        assert value in (0.0, -1.0), key
    assert empty.metrics["AR@100"] == 0.0
    preds = _sample_preds()
    with pytest.raises(ValueError, match="4242"):
        evaluate_proposals(gt, preds + [dict(preds[0], image_id=4242)])
    with pytest.raises(ValueError, match="score"):
        evaluate_proposals(gt, [{k: v for k, v in preds[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="iou-type bbox"):
        evaluate_proposals(gt, [{k: v for k, v in preds[0].items() if k != "segmentation"}])


# ---- the CLI ----------------------------------------------------------------------------------

@pytest.fixture()
def sample_file(tmp_path) -> Path:
    path = tmp_path / "labeled.json"
    path.write_text(json.dumps(_sample_preds()))
    return path


def _assert_one_line_error(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def _cli(*args: str):
    return runner.invoke(app, ["eval", "--protocol", "proposals", *args])


def test_cli_table_and_json_report(sample_file, tmp_path):
    ref = _reference(SAMPLE_GT, _sample_preds())
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(sample_file))
    assert res.exit_code == 0, res.output
    for key in ("AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"):
        row = next(line for line in res.stdout.splitlines() if f" {key} " in line)
        assert f"{100 * ref[key]:.1f}" in row, (key, row)
    assert "useCats=0" in res.stdout

    out = tmp_path / "reports" / "ar.json"
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(sample_file), "--json", str(out), "--model", "ignored")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["ar.json"]  # written atomically, no temp file left
    assert report["protocol"] == "proposals" and report["ovsam_version"]
    assert report["settings"]["iou_type"] == "segm" and report["settings"]["max_dets"] == [1, 10, 100, 1000]
    assert len(report["settings"]["pred_sha256"]) == 64
    _assert_metrics_equal(report["result"]["metrics"], ref)

    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(sample_file), "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["result"]["metrics"] == report["result"]["metrics"]
    assert res.stderr.strip() == ""


def test_cli_box_recall_and_empty_results(tmp_path):
    boxes = tmp_path / "boxes.json"
    dets = json.loads((SAMPLE / "instances_val2014_fakebbox100_results.json").read_text())
    boxes.write_text(json.dumps([d for d in dets if d["image_id"] in (139, 802)]))
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(boxes), "--json", "-", "-q")
    _assert_one_line_error(res)  # box-only results need --iou-type bbox
    assert "--iou-type bbox" in res.stderr
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(boxes), "--iou-type", "bbox", "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    _assert_metrics_equal(json.loads(res.stdout)["result"]["metrics"],
                          _reference(SAMPLE_GT, json.loads(boxes.read_text()), "bbox"))

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(empty), "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["result"]["metrics"]["AR@1000"] == 0.0


def test_cli_user_errors_are_one_line(sample_file, tmp_path):
    _assert_one_line_error(_cli("--ann", str(SAMPLE_GT)))  # no --pred
    _assert_one_line_error(_cli("--ann", str(tmp_path / "no.json"), "--pred", str(sample_file)))
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(tmp_path / "no.json"))
    _assert_one_line_error(res)
    assert "no.json" in res.stderr
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(sample_file), "--split", "ov")
    _assert_one_line_error(res)
    assert "--split ov" in res.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": ')
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(broken))
    _assert_one_line_error(res)
    assert "not valid JSON" in res.stderr
    other_images = SAMPLE / "instances_val2014_fakesegm100_results.json"  # 99 images, 2 of them in --ann
    res = _cli("--ann", str(SAMPLE_GT), "--pred", str(other_images))
    _assert_one_line_error(res)
    assert "image ids not in the ground truth" in res.stderr


def test_cli_help_explains_the_protocol():
    res = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Proposals protocol: the class-agnostic recall" in res.stdout and "useCats=0" in res.stdout
    assert "detector|prompt|proposals" in res.stdout
