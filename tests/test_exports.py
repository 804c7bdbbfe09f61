"""Exports into the tools where labels are corrected: YOLO datasets (read back by supervision),
Label Studio tasks (decoded by label-studio-sdk), and `ovsam convert` between formats, on real
COCO ground truth and real `tiny`-model outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from ovsam_cli.convert import convert
from ovsam_cli.label import label
from ovsam_model.labeling.formats import get_format
from ovsam_model.labeling.read_output import read_output

from test_cli_label import cached_model, mini  # noqa: F401  (fixtures: the cached tiny models, the mini-val data)

sv = pytest.importorskip("supervision")
brush = pytest.importorskip("label_studio_sdk.converter.brush")

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(no_args_is_help=True)
app.command("label")(label)
app.command("convert")(convert)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def _decode(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
                             ).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _contours(mask: np.ndarray) -> tuple[int, int]:
    """(outer parts, holes) of a mask."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return 0, 0
    holes = int((hierarchy[0][:, 3] >= 0).sum())
    return len(contours) - holes, holes


def _read_yolo(root: Path, masks: bool = True):
    return sv.DetectionDataset.from_yolo(images_directory_path=str(root / "images"),
                                         annotations_directory_path=str(root / "labels"),
                                         data_yaml_path=str(root / "data.yaml"), force_masks=masks)


def _by_stem(dataset) -> dict:
    return {Path(p).stem: dataset.annotations[p] for p in dataset.image_paths}


# --- YOLO ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gt_yolo(mini, tmp_path_factory):
    """The real COCO ground truth of the mini set (polygons and crowd RLEs) as a YOLO-seg dataset."""
    root, gt, *_ = mini
    out = tmp_path_factory.mktemp("yolo") / "ds"
    r = cli("convert", root / "instances.json", "--to", "yolo", "--out", out, "--images", root / "images")
    assert r.exit_code == 0, r.output
    return out, read_output(root / "instances.json"), gt


def test_yolo_seg_reads_back_in_supervision(gt_yolo):
    out, data, gt = gt_yolo
    dataset = _read_yolo(out)
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    assert dataset.classes == names  # every class, contiguous ids in category-id order
    class_of = {c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    read = _by_stem(dataset)
    checked = 0
    for entry in data.entries():
        detections = read[Path(entry["image"]["file_name"]).stem]
        assert len(detections) == len(entry["records"])  # line order = record order
        for k, rec in enumerate(entry["records"]):
            assert names[detections.class_id[k]] == names[class_of[rec["category_id"]]]
            mask = _decode(rec["segmentation"])
            got = detections.mask[k]
            assert got.shape == mask.shape
            if _contours(mask) == (1, 0):  # one part, no hole: the polygon is the contour
                assert _iou(got, mask) >= 0.9, (entry["image"]["id"], k, _iou(got, mask))
                checked += 1
            assert (got & mask).sum() >= 0.97 * mask.sum()  # every part kept, holes too
    assert checked > 200


def test_yolo_layout_and_data_yaml(gt_yolo):
    import yaml

    out, data, gt = gt_yolo
    config = yaml.safe_load((out / "data.yaml").read_text())
    assert config["path"] == str(out.resolve()) and config["train"] == config["val"] == "images"
    assert config["nc"] == 80 and config["names"][0] == "person" and config["names"][79] == "toothbrush"
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == sorted(Path(im["file_name"]).stem + ".txt" for im in gt["images"])
    assert all((out / "images" / im["file_name"]).resolve() == (Path(data.source).parent / "images" /
                                                                  im["file_name"]).resolve() for im in gt["images"])
    for line in (out / "labels" / labels[0]).read_text().splitlines():
        values = line.split()
        assert int(values[0]) in range(80) and len(values) % 2 == 1 and len(values) >= 7
        assert all(0.0 <= float(v) <= 1.0 for v in values[1:])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def _masks_dataset(tmp_path: Path, image: Path, masks: list[np.ndarray]) -> Path:
    h, w = masks[0].shape
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "score": 0.5,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(m.sum())})
    data = {"images": [{"id": 1, "file_name": image.name, "height": h, "width": w}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "masks.json"
    path.write_text(json.dumps(data))
    return path


def test_yolo_policy_parts_joined_holes_kept(mini, tmp_path):
    """Multi-part masks and holes: one polygon whose filling gives back every part and every hole
    (plus the 1-pixel bridges between parts)."""
    root, gt, *_ = mini
    im = gt["images"][0]
    h, w = im["height"], im["width"]
    donut = np.zeros((h, w), bool)
    donut[50:200, 60:260] = True
    donut[90:160, 110:200] = False
    island = donut.copy()
    island[115:135, 140:170] = True  # an island inside the hole
    parts = np.zeros((h, w), bool)
    parts[20:80, 300:360] = True
    parts[200:260, 420:500] = True
    parts[300:310, 30:40] = True
    masks = [donut, island, parts]
    assert [_contours(m) for m in masks] == [(1, 1), (2, 1), (3, 0)]
    out = tmp_path / "ds"
    r = cli("convert", _masks_dataset(tmp_path, root / "images" / im["file_name"], masks), "--to", "yolo",
            "--out", out, "--images", root / "images")
    assert r.exit_code == 0, r.output
    got = _read_yolo(out).annotations[str(out / "images" / im["file_name"])].mask
    assert len(got) == 3
    for mask, read in zip(masks, got):
        assert not (mask & ~read).any()  # every pixel of every part
        assert (read & ~mask).sum() <= 2 * (h + w)  # only bridge lines added
    assert not got[0][90:160, 110:200].any()  # the hole stays a hole
    hole = ~island[90:160, 110:200]
    # the island is kept; at most two 1-pixel bridges (each under 40 pixels here) cross the hole to reach it
    assert got[1][115:135, 140:170].all() and got[1][90:160, 110:200][hole].sum() <= 80
    assert len((out / "labels" / (Path(im["file_name"]).stem + ".txt")).read_text().splitlines()) == 3


def test_yolo_boxes(gt_yolo, mini, tmp_path):
    root, gt, *_ = mini
    out = tmp_path / "boxes"
    r = cli("convert", root / "instances.json", "--to", "yolo", "--yolo-boxes", "--out", out)
    assert r.exit_code == 0, r.output
    assert not (out / "images").exists()  # no --images: labels and data.yaml only
    (out / "images").symlink_to(root / "images")
    dataset = _read_yolo(out, masks=False)
    read = _by_stem(dataset)
    for entry in read_output(root / "instances.json").entries():
        detections = read[Path(entry["image"]["file_name"]).stem]
        lines = (out / "labels" / (Path(entry["image"]["file_name"]).stem + ".txt")).read_text().splitlines()
        assert all(len(line.split()) == 5 for line in lines)
        assert len(detections) == len(entry["records"])
        for k, rec in enumerate(entry["records"]):
            x, y, bw, bh = rec["bbox"]
            np.testing.assert_allclose(detections.xyxy[k], [x, y, x + bw, y + bh], atol=0.01)


def test_yolo_folder_is_written_atomically(gt_yolo, mini, tmp_path, monkeypatch):
    root, *_ = mini
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("convert", root / "instances.json", "--to", "yolo", "--out", out)
    assert r.exit_code != 0 and "not an earlier yolo output" in r.stderr and (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert cli("convert", root / "instances.json", "--to", "yolo", "--out", out).exit_code == 0
    (out / "labels" / "stale.txt").write_text("from an earlier export")
    first = sorted(p.name for p in (out / "labels").iterdir())
    assert cli("convert", root / "instances.json", "--to", "yolo", "--out", out).exit_code == 0  # replaced
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(set(first) - {"stale.txt"})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    from ovsam_model.labeling.formats import yolo

    calls = []

    def failing_add(self, entry):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, entry)

    original = yolo.YoloDataset.add
    monkeypatch.setattr(yolo.YoloDataset, "add", failing_add)
    r = cli("convert", root / "instances.json", "--to", "yolo", "--out", out)
    assert r.exit_code != 0 and "disk full" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no half-written folder beside it


# --- Label Studio ----------------------------------------------------------------------------

def test_labelstudio_brush_masks_decode_pixel_for_pixel(gt_yolo, tmp_path):
    out_yolo, data, gt = gt_yolo
    path = tmp_path / "tasks.json"
    r = cli("convert", data.source, "--to", "labelstudio", "--out", path)
    assert r.exit_code == 0, r.output
    tasks = json.loads(path.read_text())
    entries = list(data.entries())
    assert [t["data"]["image_id"] for t in tasks] == [e["image"]["id"] for e in entries]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    decoded = 0
    for task, entry in zip(tasks[:6], entries[:6]):
        assert task["data"]["image"] == "/data/local-files/?d=" + entry["image"]["file_name"]
        (prediction,) = task["predictions"]
        regions = prediction["result"]
        assert prediction["model_version"] == "ovsam" and len(regions) == len(entry["records"])
        for region, rec in zip(regions, entry["records"]):
            h, w = entry["image"]["height"], entry["image"]["width"]
            assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
            assert (region["original_height"], region["original_width"]) == (h, w)
            assert region["value"]["brushlabels"] == [names[rec["category_id"]]]
            assert region["from_name"] == "label" and region["to_name"] == "image"
            rgba = brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)
            assert np.array_equal(rgba[:, :, 3] > 0, _decode(rec["segmentation"]))
            decoded += 1
    assert decoded >= 40


def test_labelstudio_polygons_in_percent_and_image_root(gt_yolo, tmp_path):
    from ovsam_model.io.masks import mask_polygons

    _, data, _ = gt_yolo
    path = tmp_path / "tasks.json"
    r = cli("convert", data.source, "--to", "labelstudio", "--polygons", "--ls-image-root", "https://x.example/v 1/",
            "--out", path)
    assert r.exit_code == 0, r.output
    tasks = json.loads(path.read_text())
    for task, entry in zip(tasks, data.entries()):
        assert task["data"]["image"] == "https://x.example/v 1/" + entry["image"]["file_name"]
        h, w = entry["image"]["height"], entry["image"]["width"]
        regions = task["predictions"][0]["result"] if task["predictions"] else []
        expected = [p for rec in entry["records"] for p in mask_polygons(rec["segmentation"])]
        assert len(regions) == len(expected)
        for region, polygon in zip(regions, expected):
            points = np.array(region["value"]["points"])
            assert region["type"] == "polygonlabels" and ((points >= 0) & (points <= 100)).all()
            np.testing.assert_allclose(points * [w / 100, h / 100], np.reshape(polygon, (-1, 2)), atol=0.01)


# --- ovsam label --format yolo|labelstudio, and convert round trips on real model output ------------

@pytest.fixture(scope="module")
def labeled(mini, tmp_path_factory):
    """`ovsam label` with the tiny model on one mini image: the options, and its results array."""
    root, gt, ids, boxes = mini
    tmp = tmp_path_factory.mktemp("labeled")
    (tmp / "boxes.json").write_text(json.dumps([b for b in boxes if b["image_id"] == ids[0]][:5]))
    common = ["--model", "tiny", "--device", "cpu", "--workers", "0", "--boxes", tmp / "boxes.json",
              "--images", root / "images", "--ann", root / "instances.json", "-q"]
    r = cli("label", *common, "--out", tmp / "res.json")
    assert r.exit_code == 0, r.output
    return root, tmp, common


def test_label_writes_yolo_and_labelstudio(labeled):
    root, tmp, common = labeled
    r = cli("label", *common, "--format", "yolo", "--out", tmp / "yolo")
    assert r.exit_code == 0, r.output
    r = cli("label", *common, "--format", "labelstudio", "--out", tmp / "ls.json")
    assert r.exit_code == 0, r.output
    results = json.loads((tmp / "res.json").read_text())
    data = read_output(tmp / "res.json", ann=root / "instances.json")
    read = _by_stem(_read_yolo(tmp / "yolo"))
    lines = 0
    for entry in data.entries():
        detections = read[Path(entry["image"]["file_name"]).stem]
        masks = [_decode(rec["segmentation"]) for rec in entry["records"]]
        kept = [m for m in masks if m.sum() > 1]
        assert len(detections) == len(kept)
        for got, mask in zip(detections.mask, kept):
            assert not (mask & ~got).any()  # every pixel of the (noisy, random-weight) masks
        lines += len(detections)
    tasks = json.loads((tmp / "ls.json").read_text())
    regions = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    assert tasks[0]["predictions"][0]["model_version"] == "tiny"
    assert [r["score"] for r in regions] == [rec["score"] for rec in results if _decode(rec["segmentation"]).any()]
    for region, rec in zip(regions, results):
        h, w = region["original_height"], region["original_width"]
        assert np.array_equal(brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0,
                              _decode(rec["segmentation"]))
    assert lines > 0 and len(regions) > 0


def test_convert_round_trip_results_dataset_results(labeled):
    root, tmp, _ = labeled
    res = tmp / "rt.json"
    records = json.loads((tmp / "res.json").read_text())
    for k, rec in enumerate(records):  # fields of an everything-mode run travel along
        rec.update(stability_score=0.9 + k / 1000, point_coords=[[float(k), 2.0]])
    res.write_text(json.dumps(records))
    ds, back = tmp / "rt_dataset.json", tmp / "rt_back.json"
    r = cli("convert", res, "--to", "dataset", "--ann", root / "instances.json", "--out", ds)
    assert r.exit_code == 0, r.output
    assert cli("convert", ds, "--to", "results", "--out", back).exit_code == 0
    again = json.loads(back.read_text())
    assert again == records  # every field, every mask, the same order
    dataset = json.loads(ds.read_text())
    assert [a["segmentation"] for a in dataset["annotations"]] == [r["segmentation"] for r in records]
    assert [a["area"] for a in dataset["annotations"]] == [int(_decode(r["segmentation"]).sum()) for r in records]
    assert {im["id"] for im in dataset["images"]} == {r["image_id"] for r in records}


# --- hostile file names ----------------------------------------------------------------------

def test_hostile_file_names_never_leave_out(mini, tmp_path, monkeypatch):
    root, gt, *_ = mini
    src = gt["images"][0]
    work = tmp_path / "work"
    images = work / "images"
    for rel in ("A.jpg", "a.jpg", "d1/img.jpg", "d2/img.jpg", "a.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "images" / src["file_name"], images / rel)
    shutil.copy(root / "images" / src["file_name"], work / "evil.jpg")  # outside --images
    names = ["../evil.jpg", "/abs/x.jpg", "a\x00b.jpg", "A.jpg", "a.jpg", "d1/img.jpg", "d2/img.jpg", "a.png",
             "..\\..\\evil.jpg", "C:\\x.jpg", "labels/../../../data.yaml"]
    anns = [a for a in gt["annotations"] if a["image_id"] == src["id"]][:2]
    data = {"categories": gt["categories"], "images": [], "annotations": []}
    for i, name in enumerate(names, start=1):
        data["images"].append({**src, "id": i, "file_name": name})
        data["annotations"] += [{**a, "id": len(data["annotations"]) + 1, "image_id": i} for a in anns]
    hostile = work / "hostile.json"
    hostile.write_text(json.dumps(data))
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = work / "out"
    monkeypatch.chdir(work)  # a relative --images
    r = cli("convert", hostile, "--to", "yolo", "--out", out, "--images", "images")
    assert r.exit_code != 0 and "is not under --images" in r.stderr and not out.exists()  # names outside --images
    r = cli("convert", hostile, "--to", "yolo", "--out", out, "--images", "images", "--allow-missing-images")
    assert r.exit_code == 0, r.output
    assert "not linked" in r.stderr
    written = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    for path in written:
        assert path.absolute().is_relative_to(out.absolute()) and ".." not in path.relative_to(out).parts
    labels = sorted((out / "labels").iterdir())
    assert len(labels) == len(names) and all(len(p.read_text().splitlines()) == 2 for p in labels)
    assert len({p.name.casefold() for p in labels}) == len(names)  # nothing overwritten, on any file system
    links = {p.name: os.path.realpath(p) for p in (out / "images").iterdir()}
    assert sorted(links.values()) == sorted(str((images / n).resolve()) for n in ("A.jpg", "a.jpg", "d1/img.jpg",
                                                                                 "d2/img.jpg", "a.png"))
    assert all(Path(t).is_relative_to(images.resolve()) for t in links.values())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(out)} == snapshot
    assert not Path("/abs/x.jpg").exists()
    ls = work / "ls.json"
    assert cli("convert", hostile, "--to", "labelstudio", "--polygons", "--out", ls).exit_code == 0
    urls = [t["data"]["image"] for t in json.loads(ls.read_text())]
    assert "/data/local-files/?d=a%00b.jpg" in urls and len(urls) == len(names)


# --- one-line errors, before torch -----------------------------------------------------------

_RUN = """
import sys
sys.argv = ["ovsam", *sys.argv[1:]]
try:
    from ovsam_cli.main import run
    run()
finally:
    print("TORCH:" + str("torch" in sys.modules))
"""


def _ovsam(*args) -> tuple[int, str, bool]:
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    return proc.returncode, proc.stderr, proc.stdout.strip().endswith("TORCH:True")


def test_bad_inputs_are_one_line_errors(mini, tmp_path):
    root, gt, *_ = mini
    results = [{"image_id": gt["images"][0]["id"], "category_id": 1, "score": 0.5,
                "segmentation": gt["annotations"][0]["segmentation"]}]
    res = tmp_path / "r.json"
    res.write_text(json.dumps(results))
    empty = tmp_path / "imgs"
    empty.mkdir()
    (tmp_path / "bad.json").write_text("[{")
    cases = [
        (["convert", res, "--to", "nope", "--out", tmp_path / "o"], "Invalid value for '--to'"),
        (["convert", res, "--to", "yolo", "--out", tmp_path / "o", "--images", empty],
         f"{gt['images'][0]['id']:012d}.jpg is missing from --images"),
        (["convert", res, "--to", "yolo", "--out", tmp_path / "o", "--images", empty, "--ann", root / "instances.json"],
         f"'{gt['images'][0]['file_name']}' is not under --images"),
        (["convert", tmp_path / "bad.json", "--to", "dataset", "--out", tmp_path / "o.json"], "malformed JSON"),
        (["convert", tmp_path / "none.json", "--to", "dataset", "--out", tmp_path / "o.json"], "no such file"),
        (["convert", res, "--to", "dataset", "--out", tmp_path / "o.json"], "give --ann DATASET.json"),
        (["convert", res, "--to", "labelstudio", "--yolo-boxes", "--out", tmp_path / "o.json"],
         "--yolo-boxes does not apply to format labelstudio"),
        (["convert", root / "instances.json", "--to", "yolo", "--out", "-"], "writes a folder"),
        (["convert", res, "--to", "dataset", "--out", tmp_path / "no" / "o.json"], "does not exist"),
    ]
    for args, message in cases:
        code, err, torch_imported = _ovsam(*args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, (args, err)
        assert not torch_imported, args
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()


def test_output_format_objects_are_registered():
    assert {"yolo", "labelstudio"} <= set(__import__("ovsam_model.labeling.formats", fromlist=["x"]).format_names())
    assert get_format("yolo").marker == "data.yaml"
