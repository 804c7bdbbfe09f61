"""`read_output`: earlier outputs (results arrays, dataset JSON) read back as entries, on real COCO
ground truth and real detector masks."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ovsam_model.io.detections import InputError
from ovsam_model.labeling.read_output import LabeledOutput, read_output, to_rle

SAMPLE_IDS = (139, 802)


@pytest.fixture(scope="module")
def mini(data_dir):
    root = data_dir / "coco-val2017-mini"
    if not root.is_dir():
        pytest.skip("coco-val2017-mini not in the test data")
    return root


@pytest.fixture(scope="module")
def sample(data_dir):
    root = data_dir / "coco-detections-sample"
    if not root.is_dir():
        pytest.skip("coco-detections-sample not in the test data")
    results = json.loads((root / "instances_val2014_fakesegm100_results.json").read_text())
    return root, [r for r in results if r["image_id"] in SAMPLE_IDS]


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_dataset_json_ground_truth(mini):
    """Real COCO GT (polygons and crowd RLEs): every image in id order, every annotation's mask
    equal to pycocotools' own `annToMask`."""
    out = read_output(mini / "instances.json")
    coco = COCO(str(mini / "instances.json"))
    assert isinstance(out, LabeledOutput) and out.kind == "dataset"
    assert out.categories == [{k: c[k] for k in ("id", "name", "supercategory")} for c in coco.dataset["categories"]]
    entries = list(out.entries())
    assert [e["image"]["id"] for e in entries] == sorted(coco.getImgIds())
    assert sum(len(e["records"]) for e in entries) == len(coco.dataset["annotations"]) == out.record_count
    for entry in entries:
        img = coco.imgs[entry["image"]["id"]]
        assert entry["image"] == {k: img[k] for k in ("id", "file_name", "height", "width")}
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert [r["category_id"] for r in entry["records"]] == [a["category_id"] for a in anns]
        for rec, ann in zip(entry["records"], anns):
            assert isinstance(rec["segmentation"]["counts"], str)
            assert rec["segmentation"]["size"] == [img["height"], img["width"]]
            assert np.array_equal(_decode(rec["segmentation"]), coco.annToMask(ann).astype(bool))
            assert "id" not in rec and "iscrowd" not in rec and rec["bbox"] == ann["bbox"]


def test_results_with_ann_keep_the_detector_masks(sample, tmp_path):
    root, results = sample
    path = Path(root / "instances_val2014_fakesegm100_results.json")
    ann = root / "instances_val2017_subset_139_802.json"
    with pytest.raises(InputError, match=r"image_id \d+ is not in --ann .* \(\d+ images are not\)"):
        read_output(path, ann=ann)  # the file has 99 images, the dataset 2
    gt = json.loads(ann.read_text())
    out = read_output(_dump(results, tmp_path / "r.json"), ann=ann)
    assert out.kind == "results" and out.categories == [{k: c[k] for k in ("id", "name", "supercategory")}
                                                         for c in gt["categories"]]
    entries = list(out.entries())
    assert [e["image"]["id"] for e in entries] == list(SAMPLE_IDS)
    by_image = {i: [r for r in results if r["image_id"] == i] for i in SAMPLE_IDS}
    for entry in entries:
        expected = by_image[entry["image"]["id"]]
        assert [r["segmentation"] for r in entry["records"]] == [r["segmentation"] for r in expected]
        assert [r["score"] for r in entry["records"]] == [r["score"] for r in expected]
        for rec in entry["records"]:  # added from the mask
            assert rec["area"] == int(_decode(rec["segmentation"]).sum())
            assert rec["bbox"] == [float(v) for v in mask_utils.toBbox(rec["segmentation"])]


def _dump(obj, path: Path) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_results_with_images_folder_and_builtin_categories(sample, tmp_path):
    root, results = sample
    out = read_output(_dump(results, tmp_path / "r.json"), images=root / "images")
    assert len(out.categories) == 80 and out.categories[0] == {"id": 1, "name": "person", "supercategory": "person"}
    assert out.notes and "built-in COCO" in out.notes[0]
    gt = json.loads((root / "instances_val2017_subset_139_802.json").read_text())
    sizes = {im["id"]: (im["file_name"], im["height"], im["width"]) for im in gt["images"]}
    for entry in out.entries():  # names and sizes read from the files agree with the dataset JSON
        image = entry["image"]
        assert (image["file_name"], image["height"], image["width"]) == sizes[image["id"]]
    lvis = [dict(r, category_id=1000) for r in results]  # an LVIS id
    assert len(read_output(_dump(lvis, tmp_path / "l.json"), images=root / "images").categories) == 1203


def test_everything_mode_fields_and_polygons(sample, tmp_path):
    """Extra fields pass through; polygon segmentations (--polygons output) become the RLE that
    pycocotools makes of them."""
    root, results = sample
    extra = [dict(r, stability_score=0.97, point_coords=[[10.0, 20.0]], topk=[{"category_id": 1, "prob": 0.5}])
             for r in results]
    coco = COCO(str(root / "instances_val2017_subset_139_802.json"))
    gt_polys = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    extra[0]["segmentation"] = gt_polys[0]["segmentation"]
    extra[0]["image_id"] = gt_polys[0]["image_id"]
    extra[1]["segmentation"] = []  # a mask too small for any polygon
    out = read_output(_dump(extra, tmp_path / "e.json"), ann=root / "instances_val2017_subset_139_802.json")
    recs = [r for e in out.entries() for r in e["records"]]
    assert all(r["stability_score"] == 0.97 and r["point_coords"] == [[10.0, 20.0]] and r["topk"][0]["prob"] == 0.5
               for r in recs) and len(recs) == len(extra)
    poly = next(r for r in recs if r["image_id"] == gt_polys[0]["image_id"] and r["score"] == extra[0]["score"])
    assert np.array_equal(_decode(poly["segmentation"]), coco.annToMask(gt_polys[0]).astype(bool))
    empty = next(r for r in recs if r["score"] == extra[1]["score"] and r["image_id"] == extra[1]["image_id"])
    assert empty["area"] == 0 and not _decode(empty["segmentation"]).any()


def test_uncompressed_rle_and_json_lines_and_stdin(sample, tmp_path, monkeypatch):
    root, results = sample
    ann = root / "instances_val2017_subset_139_802.json"
    mask = _decode(results[0]["segmentation"])
    flat = mask.flatten(order="F").astype(np.uint8)
    runs, value, start = [], 0, 0  # uncompressed COCO RLE: run lengths starting with zeros
    for i in range(len(flat) + 1):
        if i == len(flat) or flat[i] != value:
            runs.append(i - start)
            start, value = i, 1 - value
    rec = dict(results[0], segmentation={"size": list(mask.shape), "counts": runs})
    out = read_output(_dump([rec], tmp_path / "u.json"), ann=ann)
    assert np.array_equal(_decode(next(out.entries())["records"][0]["segmentation"]), mask)
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    lines = read_output(tmp_path / "r.jsonl", ann=ann)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(results)))
    piped = read_output("-", ann=ann)
    assert list(lines.entries()) == list(piped.entries()) == list(read_output(_dump(results, tmp_path / "a.json"),
                                                                              ann=ann).entries())


def test_rle_conversion_refuses_other_sizes():
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 5, 1), dtype=np.uint8)))[0]
    with pytest.raises(ValueError, match=r"size \[4, 5\] on an image of size \[5, 4\]"):
        to_rle({"size": [4, 5], "counts": rle["counts"].decode()}, 5, 4)
    assert to_rle({"size": [4, 5], "counts": rle["counts"]}, 4, 5)["counts"] == rle["counts"].decode()


@pytest.mark.parametrize("case", ["no ann", "missing image", "unknown category", "malformed", "not found",
                                  "label studio", "bad segmentation", "object", "no segmentation", "builtin ids",
                                  "folder"])
def test_bad_inputs_are_one_line_errors(case, sample, tmp_path):
    root, results = sample
    ann = root / "instances_val2017_subset_139_802.json"
    path, kwargs, message = tmp_path / "in.json", {}, ""
    if case == "no ann":
        _dump(results, path)
        message = r"names no image files, sizes or classes: give --ann"
    elif case == "missing image":
        images = tmp_path / "imgs"
        images.mkdir()
        shutil.copy(root / "images" / "000000000139.jpg", images)
        _dump(results, path)
        kwargs, message = {"images": images}, r"image 802: .*000000000802\.jpg is missing from --images"
    elif case == "unknown category":
        _dump([dict(results[0], category_id=9999)], path)
        kwargs, message = {"ann": ann}, r"record 0: category_id 9999 is not among the categories"
    elif case == "malformed":
        path.write_text('[{"image_id": 1,')
        message = "malformed JSON at line 1"
    elif case == "not found":
        message = "file not found"
    elif case == "label studio":
        _dump([{"data": {"image": "x.jpg"}, "predictions": []}], path)
        message = "a Label Studio tasks file"
    elif case == "bad segmentation":
        _dump([dict(results[0], segmentation=[[1, 2]])], path)
        kwargs, message = {"ann": ann}, r"record 0 \(image 139\): bad segmentation: polygons must be"
    elif case == "object":
        _dump({"info": {}}, path)
        message = "neither a COCO results array nor a dataset JSON"
    elif case == "no segmentation":
        _dump([{k: v for k, v in results[0].items() if k != "segmentation"}], path)
        kwargs, message = {"ann": ann}, "record 0: no 'segmentation'"
    elif case == "builtin ids":
        _dump([dict(results[0], category_id=5000)], path)
        kwargs, message = {"images": root / "images"}, "neither COCO's nor LVIS's: give --ann"
    elif case == "folder":
        path = tmp_path
        message = "a folder, not a JSON file"
    with pytest.raises(InputError, match=message) as info:
        out = read_output(path, **kwargs)
        list(out.entries())
    assert "\n" not in str(info.value)

