"""`ovsam show`: the review folder on real COCO val2017 images and annotations.

Predictions are made from the real ground truth (GT-as-prediction, with scores and top-2
probabilities drawn here), with known changes (a shifted mask, a wrong class), and from the
labeling engine with the `tiny` model. The pages are checked as files, as data, and in headless
Chromium (skipped, with the reason, where it is not installed).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from ovsam_cli.show import show
from ovsam_model.review import MARKER, ReviewEvents, ReviewOptions, build_review
from ovsam_model.review.labels import Label, ReviewQueue, top2_margin
from ovsam_model.review.match import CROWD, MATCHED, MISSED, UNMATCHED, match_image
from ovsam_model.review.overlay import STATUS_COLORS, Shape, draw_overlay

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(no_args_is_help=True)
app.command("show")(show)
app.command("noop")(lambda: None)  # two commands, so `show` stays a subcommand as in main.py

PAGE_SIZE = 20
CLOSE = 0.1


def run(*args):
    return CliRunner().invoke(app, ["show", "--quiet", *map(str, args)])


# --- inputs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(data_dir) -> Path:
    path = data_dir / "coco-val2017-mini"
    if not (path / "instances.json").is_file():
        pytest.skip(f"no coco-val2017-mini in {data_dir}")
    return path


@pytest.fixture(scope="module")
def dataset(mini) -> dict:
    return json.loads((mini / "instances.json").read_text())


def _gt_rle(ann: dict, h: int, w: int) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w)) if isinstance(ann["segmentation"], list) \
        else mask_utils.frPyObjects(ann["segmentation"], h, w) if isinstance(ann["segmentation"]["counts"], list) \
        else ann["segmentation"]
    return {"size": list(rle["size"]), "counts": rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]}


def _shifted(rle: dict, dx: int) -> dict:
    """The mask moved `dx` pixels right (cut at the border)."""
    m = mask_utils.decode(rle)
    out = np.zeros_like(m)
    out[:, dx:] = m[:, : m.shape[1] - dx]
    enc = mask_utils.encode(np.asfortranarray(out))
    return {"size": list(enc["size"]), "counts": enc["counts"].decode()}


@pytest.fixture(scope="module")
def predictions(dataset) -> dict:
    """A results array from the GT (non-crowd instances), random scores and top-2 probabilities,
    with two known errors: one instance's mask shifted off its object, one given a wrong class.
    Returns {"records", "shifted": (image_id, category), "wrong": (image_id, category), ...}."""
    rng = random.Random(11)
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    anns = [a for a in dataset["annotations"] if not a["iscrowd"]]
    per_image = Counter((a["image_id"], a["category_id"]) for a in anns)
    image_classes: dict[int, set] = {}
    for a in anns:
        image_classes.setdefault(a["image_id"], set()).add(a["category_id"])
    # the shifted and the wrong-class instance: alone of their class in their image, large enough to shift
    alone = [a for a in anns if per_image[(a["image_id"], a["category_id"])] == 1 and a["bbox"][2] > 40]
    shifted_ann, wrong_ann = alone[0], next(a for a in alone if a["image_id"] != alone[0]["image_id"])
    all_ids = sorted({c["id"] for c in dataset["categories"]})
    wrong_class = next(c for c in all_ids if c not in image_classes[wrong_ann["image_id"]])
    records = []
    for a in anns:
        h, w = sizes[a["image_id"]]
        rle = _gt_rle(a, h, w)
        category = a["category_id"]
        if a is shifted_ann:
            rle = _shifted(rle, int(a["bbox"][2]) + 5)
        if a is wrong_ann:
            category = wrong_class
        p1 = round(rng.uniform(0.05, 0.99), 4)
        p2 = round(p1 - rng.uniform(0.0, 0.3), 4) if rng.random() < 0.3 else round(rng.uniform(0, p1 / 2), 4)
        p2 = max(p2, 0.0)
        records.append({"image_id": a["image_id"], "category_id": category, "score": p1, "segmentation": rle,
                        "topk": [{"category_id": category, "prob": p1}, {"category_id": all_ids[0], "prob": p2}]})
    return {"records": records, "shifted": (shifted_ann["image_id"], shifted_ann["category_id"]),
            "wrong": (wrong_ann["image_id"], wrong_class, wrong_ann["category_id"])}


@pytest.fixture(scope="module")
def built(mini, predictions, tmp_path_factory) -> dict:
    """One review folder with --gt and pages of PAGE_SIZE, built through the CLI."""
    root = tmp_path_factory.mktemp("show")
    pred = root / "pred.json"
    pred.write_text(json.dumps(predictions["records"]))
    out = root / "review"
    r = run("--pred", pred, "--images", mini / "images", "--ann", mini / "instances.json", "--gt",
            mini / "instances.json", "--out", out, "--page-size", PAGE_SIZE, "--close-margin", CLOSE)
    assert r.exit_code == 0, r.output
    return {"out": out, "pred": pred, "root": root}


def _js_data(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("=") + 1: text.rindex(";")])


def _grid_pages(out: Path) -> list[Path]:
    return [out / "index.html", *sorted(out.glob("grid-*.html"))]


def _figure_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<figure class="thumb" data-id="(\d+)"', html)]


# --- the folder ------------------------------------------------------------------------------

def test_every_image_has_an_overlay_thumbnail_and_page_and_the_set_is_paged(built, dataset, mini):
    out = built["out"]
    images = {img["id"]: img for img in dataset["images"]}
    pages = _grid_pages(out)
    assert len(pages) == -(-len(images) // PAGE_SIZE) == 3
    per_page = [_figure_ids(p.read_text()) for p in pages]
    assert [len(ids) for ids in per_page] == [20, 20, 8]
    assert sorted(i for ids in per_page for i in ids) == sorted(images)  # every image once, in id order
    assert [i for ids in per_page for i in ids] == sorted(images)
    meta = _js_data(out / "data" / "meta.js")
    assert [p["images"] for p in meta["pages"]] == [20, 20, 8]
    for number, ids in enumerate(per_page, start=1):
        assert sorted(int(k) for k in _js_data(out / "data" / f"grid-{number:04d}.js")) == sorted(ids)
    for image_id, img in images.items():
        stem = Path(img["file_name"]).stem
        overlay, thumb, page = out / "overlays" / f"{stem}.jpg", out / "thumbs" / f"{stem}.jpg", out / "pages" / f"{stem}.html"
        assert overlay.is_file() and thumb.is_file() and page.is_file(), img["file_name"]
        with Image.open(overlay) as im:
            assert im.size == (img["width"], img["height"])
        with Image.open(thumb) as im:
            assert max(im.size) <= 320
        assert f'src="../overlays/{stem}.jpg"' in page.read_text()
    assert json.loads((out / MARKER).read_text())["images"] == len(images)
    assert not list(out.parent.glob(".review.*"))


def test_overlays_fill_the_masks(built, dataset, mini, predictions):
    """Pixels inside a prediction's mask change much more than pixels outside every mask (where
    only outlines, label boxes and JPEG noise differ)."""
    img = max(dataset["images"], key=lambda i: sum(r["image_id"] == i["id"] for r in predictions["records"]))
    masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in predictions["records"] if r["image_id"] == img["id"]]
    inside = np.logical_or.reduce(masks)
    original = np.asarray(Image.open(mini / "images" / img["file_name"]).convert("RGB"), dtype=float)
    overlay = np.asarray(Image.open(built["out"] / "overlays" / f"{Path(img['file_name']).stem}.jpg"), dtype=float)
    diff = np.abs(overlay - original).mean(axis=2)
    assert np.median(diff[inside]) > 15 > np.median(diff[~inside]) + 10


def _statuses(out: Path) -> dict[int, dict]:
    data = {}
    for js in sorted((out / "data").glob("grid-*.js")):
        data.update({int(k): v for k, v in _js_data(js).items()})
    return data


def test_gt_marks_match_pycocotools_iou(built, dataset, predictions):
    """Every prediction's status is what pycocotools' mask IoU against the GT says (IoU ≥ 0.5 with
    an instance of its class); the shifted and the wrong-class predictions are unmatched and their
    GT instances are listed as missed."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    gt_by_image: dict[int, list] = {}
    for a in dataset["annotations"]:
        if not a["iscrowd"]:
            gt_by_image.setdefault(a["image_id"], []).append(a)
    data = _statuses(built["out"])
    seen = Counter()
    for image_id, entry in data.items():
        preds = [r for r in predictions["records"] if r["image_id"] == image_id]
        assert [l[0] for l in entry["l"]] == [r["category_id"] for r in preds]
        for label, pred in zip(entry["l"], preds):
            same = [a for a in gt_by_image.get(image_id, []) if a["category_id"] == pred["category_id"]]
            ious = mask_utils.iou([pred["segmentation"]], [_gt_rle(a, *sizes[image_id]) for a in same], [0] * len(same)) \
                if same else np.zeros((1, 0))
            expected = MATCHED if np.size(ious) and np.max(ious) >= 0.5 else UNMATCHED
            assert label[3] == expected, (image_id, pred["category_id"], ious)
            seen[expected] += 1
    assert seen[UNMATCHED] == 2 and seen[MATCHED] == len(predictions["records"]) - 2
    shifted_image, shifted_class = predictions["shifted"]
    wrong_image, wrong_class, true_class = predictions["wrong"]
    assert data[shifted_image]["m"] == [shifted_class]
    assert data[wrong_image]["m"] == [true_class]
    assert sum(len(e["m"]) for e in data.values()) == 2
    assert [l[3] for l in data[wrong_image]["l"] if l[0] == wrong_class] == [UNMATCHED]
    index = (built["out"] / "index.html").read_text()
    assert "2 unmatched" in index and "2 GT missed" in index


def test_match_is_greedy_by_score_and_knows_crowd_regions():
    """Two predictions on one GT instance: the higher score takes it; a prediction on a crowd
    region is 'crowd'; a GT instance of another class is missed."""
    h, w = 40, 60

    def box_rle(x1, y1, x2, y2):
        m = np.zeros((h, w, 1), np.uint8, order="F")
        m[y1:y2, x1:x2] = 1
        enc = mask_utils.encode(m)[0]
        return {"size": [h, w], "counts": enc["counts"].decode()}

    gts = [{"category_id": 1, "segmentation": box_rle(0, 0, 20, 20), "bbox": [0, 0, 20, 20]},
           {"category_id": 1, "segmentation": box_rle(30, 0, 60, 40), "bbox": [30, 0, 30, 40], "iscrowd": 1},
           {"category_id": 2, "segmentation": box_rle(0, 25, 10, 35), "bbox": [0, 25, 10, 10]}]
    preds = [{"category_id": 1, "score": 0.4, "segmentation": box_rle(0, 0, 20, 20)},
             {"category_id": 1, "score": 0.9, "segmentation": box_rle(1, 0, 20, 20)},
             {"category_id": 1, "score": 0.5, "segmentation": box_rle(40, 10, 50, 20)}]
    result = match_image(preds, gts, h, w)
    assert result.status == [UNMATCHED, MATCHED, CROWD]
    assert result.missed == [2]


# --- the review queue ------------------------------------------------------------------------

def _queue_rows(out: Path) -> list[dict]:
    rows = []
    pages = [out / "queue.html", *sorted(out.glob("queue-*.html"))]
    for page in pages:
        for attrs, body in re.findall(r'<tr class="label-row queue-row"([^>]*)>(.*?)</tr>', page.read_text()):
            get = dict(re.findall(r'data-([a-z]+)="([^"]*)"', attrs))
            rows.append({"image": int(get["image"]), "index": int(get["index"]), "score": float(get["score"]),
                         "margin": float(get["margin"]) if get["margin"] else None, "close": "close top-2" in body})
    return rows


def test_queue_lowest_score_first_and_close_top2_flagged(built, predictions):
    rows = _queue_rows(built["out"])
    records = predictions["records"]
    assert len(rows) == len(records)  # the default queue size holds them all
    assert [r["score"] for r in rows] == sorted(r["score"] for r in records)
    for row in rows:
        margin, _, _ = top2_margin([t for t in records if t["image_id"] == row["image"]][row["index"]]["topk"])
        assert row["margin"] == margin and row["close"] == (margin < CLOSE)
    assert 0 < sum(r["close"] for r in rows) < len(rows)


def test_a_short_queue_keeps_the_lowest_scores_and_the_closest_margins():
    rng = random.Random(3)
    labels = [(pos, Label(index=0, category_id=1, score=rng.random(), margin=rng.random() * 0.3))
              for pos in range(300)]
    queue = ReviewQueue(size=10, close_margin=0.1)
    for pos, label in labels:
        queue.add(pos, label)
    lowest = sorted(labels, key=lambda x: x[1].score)[:10]
    closest = sorted((x for x in labels if x[1].margin < 0.1), key=lambda x: x[1].margin)[:10]
    expected = {pos for pos, _ in lowest + closest}
    items = queue.items()
    assert {i.position for i in items} == expected
    assert [i.score for i in items] == sorted(i.score for i in items)
    assert queue.low_cutoff() == lowest[-1][1].score


def test_top2_margin_sorts_by_probability():
    assert top2_margin([{"category_id": 3, "prob": 0.2}, {"category_id": 5, "prob": 0.7}]) == (0.5, 3, (0.7, 0.2))
    assert top2_margin([{"category_id": 3, "prob": 0.2}]) == (None, None, ())
    assert top2_margin(None) == (None, None, ())


def test_missed_gt_is_outlined_in_its_colour():
    image = np.zeros((50, 50, 3), np.uint8)
    m = np.zeros((50, 50, 1), np.uint8, order="F")
    m[10:40, 10:40] = 1
    rle = mask_utils.encode(m)[0]
    drawn = draw_overlay(image, [Shape(rle, [10, 10, 30, 30], MISSED, "missed x", outline_only=True)], text_scale=0.3)
    orange = np.all(drawn == STATUS_COLORS[MISSED], axis=2)
    assert orange[10:40, 10].sum() > 10  # the outline's left edge
    assert not drawn[20:30, 20:30].any()  # outline only: the inside is not filled


# --- other inputs ----------------------------------------------------------------------------

def test_everything_mode_dataset_json_shows_extra_fields(mini, dataset, tmp_path):
    """A dataset JSON of everything-mode records (stability_score, point_coords), here without
    score or topk: scores count as 1.0 and nothing has a margin."""
    images = dataset["images"][:3]
    ids = {img["id"] for img in images}
    anns = [dict(a, stability_score=0.9, point_coords=[[1.0, 2.0]]) for a in dataset["annotations"]
            if a["image_id"] in ids and not a["iscrowd"]]
    for a in anns:
        a.pop("bbox")
    pred = tmp_path / "everything.json"
    pred.write_text(json.dumps({"images": images, "annotations": anns, "categories": dataset["categories"]}))
    r = run("--pred", pred, "--images", mini / "images", "--out", tmp_path / "review")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "review" / "pages" / f"{Path(images[0]['file_name']).stem}.html").read_text()
    assert "<th>stability_score</th>" in page and "<th>point_coords</th>" in page and "[[1.0, 2.0]]" in page
    assert len(_figure_ids((tmp_path / "review" / "index.html").read_text())) == 3


def test_real_detector_masks_without_topk(data_dir, tmp_path):
    """A real detector's results array with RLE masks (cocoapi's segm results) on the two sample
    images, against their real GT: no topk, so no margin and nothing flagged close."""
    sample = data_dir / "coco-detections-sample"
    if not sample.is_dir():
        pytest.skip(f"no coco-detections-sample in {data_dir}")
    results = json.loads((sample / "instances_val2014_fakesegm100_results.json").read_text())
    records = [r for r in results if r["image_id"] in (139, 802)]
    (tmp_path / "segm.json").write_text(json.dumps(records))
    gt = sample / "instances_val2017_subset_139_802.json"
    r = run("--pred", tmp_path / "segm.json", "--images", sample / "images", "--gt", gt, "--out", tmp_path / "review")
    assert r.exit_code == 0, r.output
    data = _statuses(tmp_path / "review")
    assert sorted(data) == [139, 802] and sum(len(e["l"]) for e in data.values()) == len(records) > 0
    statuses = Counter(l[3] for e in data.values() for l in e["l"])
    assert statuses[MATCHED] > 0 and statuses[UNMATCHED] > 0  # a real detector gets some right, some wrong
    assert all(l[2] is None for e in data.values() for l in e["l"])
    rows = _queue_rows(tmp_path / "review")
    assert [row["score"] for row in rows] == sorted(rec["score"] for rec in records) and not any(r["close"] for r in rows)


def test_exif_rotated_image_is_drawn_in_the_frame_of_the_output(mini, dataset, tmp_path):
    """A JPEG stored landscape with EXIF orientation 6 and a dataset that gives the portrait
    size: the overlay is portrait; with --exif ignore the size mismatch is one line."""
    img = next(i for i in dataset["images"] if i["width"] != i["height"])
    pixels = Image.open(mini / "images" / img["file_name"]).convert("RGB")
    folder = tmp_path / "images"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels.save(folder / "rot.jpg", exif=exif.tobytes())
    h, w = img["width"], img["height"]  # the rotated frame
    m = np.zeros((h, w, 1), np.uint8, order="F")
    m[: h // 2, : w // 3] = 1
    enc = mask_utils.encode(m)[0]
    ann = {"images": [{"id": 1, "file_name": "rot.jpg", "height": h, "width": w}], "categories": dataset["categories"],
           "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "pred.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5,
                                                      "segmentation": {"size": [h, w], "counts": enc["counts"].decode()}}]))
    args = ["--pred", tmp_path / "pred.json", "--images", folder, "--ann", tmp_path / "ann.json"]
    r = run(*args, "--out", tmp_path / "review")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "review" / "overlays" / "rot.jpg") as im:
        assert im.size == (w, h)
    bad = run(*args, "--out", tmp_path / "review2", "--exif", "ignore")
    assert bad.exit_code == 2 and "EXIF orientation 6" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# --- hostile file names ----------------------------------------------------------------------

def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_file_names_never_write_outside_out(mini, dataset, tmp_path):
    """`../`, an absolute path, HTML in a name, names differing only in case, the same stem in
    two folders or with two extensions, a name that becomes a folder's name: every image gets its
    own files, all inside --out."""
    src = mini / "images" / dataset["images"][0]["file_name"]
    h, w = dataset["images"][0]["height"], dataset["images"][0]["width"]
    root = tmp_path / "root"
    images = root / "data" / "images"
    for rel in ("a/x.jpg", "b/x.jpg", "Case.jpg", "case.jpg", "twin.jpg", "twin.png", "<b>bold</b> x.jpg", "x",
                "x.jpg/y.jpg"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.open(src).save(images / rel)
        else:
            shutil.copy(src, images / rel)
    shutil.copy(src, root / "data" / "escape.jpg")
    shutil.copy(src, root / "abs.jpg")
    names = ["a/x.jpg", "b/x.jpg", "Case.jpg", "case.jpg", "twin.jpg", "twin.png", "<b>bold</b> x.jpg",
             "x.jpg/y.jpg", "x",  # "x" → x.jpg, where the folder x.jpg/ already is
             "../escape.jpg", str(root / "abs.jpg"), "a/../../escape.jpg"]
    ann = {"images": [{"id": i + 1, "file_name": n, "height": h, "width": w} for i, n in enumerate(names)],
           "categories": dataset["categories"], "annotations": []}
    (root / "ann.json").write_text(json.dumps(ann))
    m = np.zeros((h, w, 1), np.uint8, order="F")
    m[10:60, 10:60] = 1
    counts = mask_utils.encode(m)[0]["counts"].decode()
    preds = [{"image_id": i + 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [h, w], "counts": counts}}
             for i in range(len(names))]
    (root / "pred.json").write_text(json.dumps(preds))
    before = _tree(tmp_path)
    out = root / "out" / "review"
    (root / "out").mkdir()
    r = run("--pred", root / "pred.json", "--images", images, "--ann", root / "ann.json", "--out", out)
    assert r.exit_code == 0, r.output
    new = {p for p in _tree(tmp_path) - before if not p.startswith("root/out")}
    assert new == set(), new  # nothing written outside --out
    overlays = sorted(p for p in (out / "overlays").rglob("*") if p.is_file())
    pages = sorted(p for p in (out / "pages").rglob("*") if p.is_file())
    assert len(overlays) == len(pages) == len(names)  # no two images share a file
    assert len({str(p).casefold() for p in overlays}) == len(names)  # not even on a case-insensitive disk
    for p in overlays + pages + sorted((out / "thumbs").rglob("*.jpg")):
        assert p.resolve().is_relative_to(out.resolve())
    html = "".join(p.read_text() for p in [out / "index.html", *pages])
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt; x.jpg" in html
    links = re.findall(r'(?:href|src)="([^"#]+)', (out / "index.html").read_text())
    for link in links:  # every link of the grid resolves to a file of the folder
        from urllib.parse import unquote

        target = (out / unquote(link)).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file(), link


def test_nul_byte_in_a_file_name_is_one_line(mini, dataset, tmp_path):
    img = dataset["images"][0]
    ann = {"images": [{"id": 1, "file_name": "bad\x00name.jpg", "height": img["height"], "width": img["width"]}],
           "categories": dataset["categories"], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "pred.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 1,
                                                      "segmentation": [[1, 1, 20, 1, 20, 20]]}]))
    r = run("--pred", tmp_path / "pred.json", "--images", mini / "images", "--ann", tmp_path / "ann.json",
            "--out", tmp_path / "review")
    assert r.exit_code == 2 and "not found in --images" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "review").exists()


# --- bad inputs ------------------------------------------------------------------------------

@pytest.fixture()
def small(mini, dataset, tmp_path) -> dict:
    """Two images, their files, GT and predictions, in tmp_path."""
    images = dataset["images"][:2]
    ids = {i["id"] for i in images}
    folder = tmp_path / "images"
    folder.mkdir()
    for img in images:
        shutil.copy(mini / "images" / img["file_name"], folder / img["file_name"])
    anns = [a for a in dataset["annotations"] if a["image_id"] in ids]
    gt = {"images": images, "annotations": anns, "categories": dataset["categories"]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5, "segmentation": a["segmentation"]}
             for a in anns if not a["iscrowd"]]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    return {"dir": tmp_path, "images": folder, "gt": tmp_path / "gt.json", "pred": tmp_path / "pred.json",
            "gt_data": gt, "preds": preds}


def _one_line_error(r, message: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_bad_inputs_are_one_line_errors(small):
    d = small["dir"]
    args = ["--images", small["images"], "--ann", small["gt"]]
    _one_line_error(run("--pred", d / "nope.json", *args, "--out", d / "r"), "--pred")
    _one_line_error(run("--pred", small["pred"], "--images", d / "nope", "--out", d / "r"), "no such directory")
    _one_line_error(run("--pred", small["pred"], *args, "--gt", d / "nope.json", "--out", d / "r"), "--gt")
    # an image id that --ann lacks
    (d / "unknown.json").write_text(json.dumps(small["preds"] + [dict(small["preds"][0], image_id=999999)]))
    _one_line_error(run("--pred", d / "unknown.json", *args, "--out", d / "r"), "999999")
    # --gt without one of the images
    gt = dict(small["gt_data"], images=small["gt_data"]["images"][:1])
    (d / "gt1.json").write_text(json.dumps(gt))
    _one_line_error(run("--pred", small["pred"], *args, "--gt", d / "gt1.json", "--out", d / "r"), "not in --gt")
    # an image missing from --images
    missing = small["gt_data"]["images"][1]["file_name"]
    (small["images"] / missing).unlink()
    _one_line_error(run("--pred", small["pred"], *args, "--out", d / "r"), f"({missing}): not found in --images")
    # --out: a folder of something else
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(run("--pred", small["pred"], *args, "--out", d / "mine"), "did not write")
    assert (d / "mine" / "notes.txt").read_text() == "keep me"
    assert not (d / "r").exists() and not list(d.glob(".r.*"))


def test_a_mistake_is_reported_before_torch_is_imported(small):
    code = ("import sys; sys.argv = ['ovsam', *sys.argv[1:]]\n"
            "try:\n    from ovsam_cli.main import run; run()\n"
            "finally:\n    print('HEAVY:' + ','.join(m for m in ('torch', 'supervision') if m in sys.modules))")
    d = small["dir"]
    proc = subprocess.run([sys.executable, "-c", code, "show", "--pred", str(d / "nope.json"), "--images",
                           str(small["images"]), "--out", str(d / "r")], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip() == "HEAVY:", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "file not found" in proc.stderr


def test_interrupted_run_leaves_the_previous_review(small):
    d, out = small["dir"], small["dir"] / "review"
    args = dict(ann=small["gt"])
    build_review(small["pred"], small["images"], out, **args)
    before = (out / "index.html").read_text()

    class Interrupt(ReviewEvents):
        def image_done(self, card) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_review(small["pred"], small["images"], out, gt=small["gt"], events=Interrupt(), **args)
    assert (out / "index.html").read_text() == before and (out / MARKER).is_file()
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(KeyboardInterrupt):  # no earlier review: nothing at all
        build_review(small["pred"], small["images"], d / "new", events=Interrupt(), **args)
    assert not (d / "new").exists()
    # a second, complete run replaces the first
    build_review(small["pred"], small["images"], out, gt=small["gt"], options=ReviewOptions(title="second"), **args)
    assert "second" in (out / "index.html").read_text()


# --- in a browser ----------------------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium); the page's scripts were not run")


def _browser(*args: str, profile: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _doms(jobs: list[tuple[Path, str]], tmp_path: Path) -> list[str]:
    """The DOM of each (page, URL fragment) after its scripts ran (a fragment "--screenshot=FILE"
    takes a 1280×1000 screenshot instead); one browser process each, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def dump(job):
        n, (page, fragment) = job
        if fragment.startswith("--screenshot="):
            return _browser(fragment, "--window-size=1280,1000", page.resolve().as_uri(),
                            profile=tmp_path / f"profile-{n}").stdout
        return _browser("--dump-dom", page.resolve().as_uri() + fragment, profile=tmp_path / f"profile-{n}").stdout

    with ThreadPoolExecutor(4) as pool:
        doms = list(pool.map(dump, enumerate(jobs)))
    for (page, fragment), dom in zip(jobs, doms):
        assert fragment.startswith("--screenshot=") or 'data-ready="1"' in dom, f"the script of {page.name}{fragment} did not run"
    return doms


def _visible_ids(dom: str) -> list[int]:
    out = []
    for tag in re.findall(r"<figure [^>]*>", dom):
        if "hidden" not in tag:
            out.append(int(re.search(r'data-id="(\d+)"', tag).group(1)))
    return out


def _count(dom: str) -> int:
    return int(re.search(r'<span id="visible-count">(\d+)</span>', dom).group(1))


def test_pages_in_headless_chromium(built, predictions, dataset, tmp_path):
    """Each grid page's DOM lists its images (together: every image); the filters in the URL show
    exactly the images with a matching label, sorted by score when asked; the queue's rows filter
    too; a screenshot of the grid is not blank."""
    _chromium()
    out = built["out"]
    records = predictions["records"]
    grid = _grid_pages(out)
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    person, lo, hi = 1, 0.3, 0.6
    shifted_page = next(p for p in grid if predictions["shifted"][0] in _figure_ids(p.read_text()))
    rows = _queue_rows(out)
    queue_pages = [out / "queue.html", *sorted(out.glob("queue-*.html"))]
    mixed = next(n for n in range(len(queue_pages))  # a queue page with close and other labels
                 if 0 < sum(r["close"] for r in rows[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]) < PAGE_SIZE)
    filters = [(f"#class={person}", lambda r: r["category_id"] == person),
               (f"#class={names[person]}", lambda r: r["category_id"] == person),
               (f"#min={lo}&max={hi}&sort=score-asc", lambda r: lo <= r["score"] <= hi)]
    jobs = [(page, fragment) for page, (fragment, _) in zip(grid, filters)]
    jobs += [(shifted_page, "#status=unmatched"), (queue_pages[mixed], "#close=1")]
    shot = tmp_path / "grid.png"
    doms = _doms(jobs + [(out / "index.html", f"--screenshot={shot}")], tmp_path)[:-1]
    listed = []
    for page, (fragment, keep), dom in zip(grid, filters, doms):
        on_page = _figure_ids(page.read_text())
        assert sorted(int(i) for i in re.findall(r'<figure class="thumb"[^>]*data-id="(\d+)"', dom)) == sorted(on_page)
        listed += on_page
        expected = [i for i in on_page if any(r["image_id"] == i and keep(r) for r in records)]
        assert 0 < len(expected) < len(on_page), fragment  # the filter has something to do
        assert sorted(_visible_ids(dom)) == sorted(expected) and _count(dom) == len(expected), fragment
        if "sort=score-asc" in fragment:
            worst = {i: min(r["score"] for r in records if r["image_id"] == i and keep(r)) for i in expected}
            assert _visible_ids(dom) == sorted(expected, key=lambda i: (worst[i], on_page.index(i)))
    assert sorted(listed) == sorted(img["id"] for img in dataset["images"])  # every image is on a page
    by_status, queue = doms[len(grid):]
    assert _visible_ids(by_status) == [predictions["shifted"][0]]
    tags = re.findall(r'<tr class="label-row queue-row"[^>]*>', queue)
    shown = [t for t in tags if "hidden" not in t]
    assert _count(queue) == len(shown) == sum(r["close"] for r in rows[mixed * PAGE_SIZE:(mixed + 1) * PAGE_SIZE])
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1280)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
