"""`ovsam label` end to end with the `tiny` model (real architecture, random weights) on real COCO data."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import ovsam_model.labeling.api as api_mod
from ovsam_model.labeling.formats import JsonFileFormat
from ovsam_cli.label import label

app = typer.Typer(no_args_is_help=True)
app.command("label")(label)
app.command("noop")(lambda: None)  # two commands, so `label` stays a subcommand as in main.py

_real_load = api_mod.load_predictor
_cache: dict = {}


def _vocab_key(vocabulary):
    if vocabulary is None or isinstance(vocabulary, (str, Path)):
        return vocabulary
    return (vocabulary.name, tuple(vocabulary.category_ids), tuple(vocabulary.class_names))


def _key(settings, vocabulary=None) -> tuple:
    key = (settings.model, _vocab_key(vocabulary), settings.vocab_names, settings.topk, settings.roi_box, settings.box_batch)
    return key if settings.device == "cpu" else key + (settings.device, settings.amp)


def _coco_predictor():
    """The cached tiny model with the COCO vocabulary (what an --ann of COCO categories selects)."""
    return next(p for k, p in _cache.items() if isinstance(k[1], tuple) and k[1][0] == "coco" and k[3] == 5)


@pytest.fixture(autouse=True)
def cached_model(monkeypatch):
    """Build each (model, vocabulary, topk, roi_box) once through the real builder: the suite stays fast."""

    def load(settings, vocabulary=None):
        key = _key(settings, vocabulary)
        if key not in _cache:
            _cache[key] = _real_load(settings, vocabulary)
        return _cache[key]

    monkeypatch.setattr(api_mod, "load_predictor", load)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def run(*args, input=None, device="cpu"):
    return CliRunner().invoke(app, ["label", "--model", "tiny", "--device", device, "--workers", "0", *map(str, args)], input=input)


@pytest.fixture(scope="module")
def mini(data_dir):
    root = data_dir / "coco-val2017-mini"
    if not root.is_dir():
        pytest.skip("coco-val2017-mini not in the test data")
    gt = json.loads((root / "instances.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])[:3]
    boxes = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
        if a["image_id"] in ids and not a["iscrowd"]
    ]
    return root, gt, ids, boxes


def _lvis_gt(coco_gt: dict) -> dict:
    """A minimal LVIS-style GT from a COCO one (coco_url instead of file_name, LVIS fields)."""
    gt = copy.deepcopy(coco_gt)
    for im in gt["images"]:
        im.pop("file_name", None)
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    for c in gt["categories"]:
        c.update(frequency="f", image_count=1, instance_count=1, synonyms=[c["name"]])
    gt["annotations"] = [a for a in gt["annotations"] if not a.get("iscrowd")]
    return gt


def _check_loadable(results: list, gt: dict, tmp_path: Path) -> None:
    from lvis import LVIS, LVISResults
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    loaded = coco.loadRes(copy.deepcopy(results))
    assert len(loaded.getAnnIds()) == len(results)
    lvis_path = tmp_path / "lvis_gt.json"
    lvis_path.write_text(json.dumps(_lvis_gt(gt)))
    lres = LVISResults(LVIS(str(lvis_path)), copy.deepcopy(results), max_dets=300)
    assert len(lres.get_ann_ids()) == len(results)


def test_mini_end_to_end(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "labeled.json"
    r = run("--boxes", tmp_path / "boxes.json", "--images", root / "images", "--ann", root / "instances.json", "--out", out, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    assert f"labeled 3 images, {len(boxes)} prompts" in r.stderr
    results = json.loads(out.read_text())
    assert len(results) == len(boxes)
    # same boxes, same order (image id, then input order)
    expected = sorted(range(len(boxes)), key=lambda i: (boxes[i]["image_id"], i))
    assert [(r["image_id"], r["detector_category_id"]) for r in results] == [(boxes[i]["image_id"], boxes[i]["category_id"]) for i in expected]
    sizes = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
    assert all(rec["segmentation"]["size"] == sizes[rec["image_id"]] for rec in results)
    vocab_ids = set(_coco_predictor().category_ids)
    assert sorted(vocab_ids) == sorted(c["id"] for c in gt["categories"])
    assert all(rec["category_id"] in vocab_ids and 0 <= rec["score"] <= 0.9 + 1e-6 for rec in results)
    assert all(len(rec["topk"]) == 5 for rec in results)
    assert not list(tmp_path.glob("*.partial*"))
    _check_loadable(results, gt, tmp_path)


def test_detector_outputs_sample(data_dir, tmp_path):
    root = data_dir / "coco-detections-sample"
    if not root.is_dir():
        pytest.skip("coco-detections-sample not in the test data")
    dets = json.loads((root / "instances_val2014_fakebbox100_results.json").read_text())
    dets = [d for d in dets if d["image_id"] in (139, 802)]
    gt = json.loads((root / "instances_val2017_subset_139_802.json").read_text())
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "out.json"
    r = run("--boxes", tmp_path / "dets.json", "--images", root / "images", "--ann", root / "instances_val2017_subset_139_802.json",
            "--out", out, "--label-source", "detector", "--score-thr", 0.3)
    assert r.exit_code == 0, r.output
    kept = [d for d in dets if d["score"] >= 0.3]
    results = json.loads(out.read_text())
    assert len(results) == len(kept) > 0
    assert sorted((x["image_id"], x["category_id"], x["score"]) for x in results) == sorted((d["image_id"], d["category_id"], d["score"]) for d in kept)
    assert f"score below --score-thr: {len(dets) - len(kept)}" in r.stderr
    _check_loadable(results, gt, tmp_path)


def test_stdin_stdout_and_dataset_format(mini, tmp_path):
    from pycocotools.coco import COCO

    root, gt, ids, boxes = mini
    one = [b for b in boxes if b["image_id"] == ids[0]]
    lines = "\n".join(json.dumps(b) for b in one) + "\n"
    r = run("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", "--format", "dataset", "--quiet", input=lines)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    ds = json.loads(r.stdout)
    assert [im["id"] for im in ds["images"]] == [ids[0]] and len(ds["annotations"]) == len(one)
    (tmp_path / "ds.json").write_text(r.stdout)
    coco = COCO(str(tmp_path / "ds.json"))
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert ann["area"] == int(coco.annToMask(ann).sum())


def test_points_polygons_no_ann(mini, tmp_path):
    root, gt, ids, boxes = mini
    b = next(b for b in boxes if b["image_id"] == ids[0])
    x, y, w, h = b["bbox"]
    clicks = [{"image_id": ids[0], "points": [[x + w / 2, y + h / 2], [x + 1, y + 1]], "labels": [1, 0]},
              {"image_id": ids[0], "points": [[x + w / 2, y + h / 2]], "labels": [1]}]
    (tmp_path / "p.json").write_text(json.dumps(clicks))
    r = run("--points", tmp_path / "p.json", "--images", root / "images", "--format", "dataset", "--polygons", "-q")
    assert r.exit_code == 0, r.output
    ds = json.loads(r.stdout)
    assert len(ds["annotations"]) == 2
    assert all(isinstance(a["segmentation"], list) for a in ds["annotations"])
    assert ds["images"][0]["file_name"] == f"{ids[0]:012d}.jpg"


def _interrupt_after(monkeypatch, n_images: int):
    predictor = _coco_predictor()
    original = predictor.predict_prepared
    seen = {"n": 0}

    def flaky(images, prompts, **kwargs):
        if seen["n"] >= n_images:
            raise KeyboardInterrupt
        seen["n"] += len(images)
        return original(images, prompts, **kwargs)

    monkeypatch.setattr(predictor, "predict_prepared", flaky)


def test_resume_after_interrupt_is_identical(mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    args = ["--boxes", tmp_path / "boxes.json", "--images", root / "images", "--ann", root / "instances.json", "--batch-size", 1, "-q"]
    ref = tmp_path / "ref.json"
    assert run(*args, "--out", ref).exit_code == 0
    out = tmp_path / "out.json"
    _interrupt_after(monkeypatch, 2)
    r = run(*args, "--out", out)
    assert r.exit_code == 130 and "--resume" in r.stderr
    assert not out.exists()
    part = tmp_path / "out.json.partial.jsonl"
    lines = [json.loads(line) for line in part.read_text().splitlines()]
    assert lines[1].keys() == {"owner"} and sum("image" in line for line in lines) == 2  # 2 images done
    with open(part, "a") as f:
        f.write('{"image":{"id":1')  # a torn line, as after SIGKILL
    monkeypatch.undo()
    monkeypatch.setattr(api_mod, "load_predictor", lambda settings, vocabulary=None: _cache[_key(settings, vocabulary)])
    r = run(*args, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()
    assert not part.exists()


def test_two_rank_shards_merge(mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    args = ["--boxes", tmp_path / "boxes.json", "--images", root / "images", "--ann", root / "instances.json", "-q"]
    ref = tmp_path / "ref.json"
    assert run(*args, "--out", ref).exit_code == 0
    out = tmp_path / "out.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(*args, "--out", out).exit_code == 0  # rank 1: its part file only
    assert not out.exists()
    rank1 = [json.loads(l) for l in (tmp_path / "out.json.partial.rank1.jsonl").read_text().splitlines()]
    assert [e["image"]["id"] for e in rank1 if "image" in e] == [sorted(ids)[1]]
    monkeypatch.setenv("RANK", "0")
    assert run(*args, "--out", out).exit_code == 0  # rank 0 waits for rank 1 (done) and merges
    assert out.read_bytes() == ref.read_bytes()
    assert not list(tmp_path.glob("*.partial*"))


def test_imported_embedding_vocabulary(mini, tmp_path):
    """A Detic-style .npy of class embeddings with a names file becomes the label vocabulary."""
    import numpy as np

    root, _, _, boxes = mini
    np.save(tmp_path / "vocab.npy", np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32))
    (tmp_path / "names.txt").write_text("apple\nbanana\ncherry\n")
    (tmp_path / "boxes.json").write_text(json.dumps(boxes[:5]))
    out = tmp_path / "out.json"
    common = ["--boxes", tmp_path / "boxes.json", "--images", root / "images", "--ann", root / "instances.json",
              "--vocab", tmp_path / "vocab.npy", "--format", "dataset", "--out", out]
    r = run(*common, "--vocab-names", tmp_path / "names.txt")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "apple"), (2, "banana"), (3, "cherry")]
    assert len(data["annotations"]) == 5 and {a["category_id"] for a in data["annotations"]} <= {1, 2, 3}
    (tmp_path / "two.txt").write_text("apple\nbanana\n")
    bad = run(*common, "--vocab-names", tmp_path / "two.txt")
    assert bad.exit_code == 2 and "3 class embeddings" in bad.output and "2 names" in bad.output
    assert "Traceback" not in bad.output


def test_empty_detections_give_empty_output(mini, tmp_path):
    root, *_ = mini
    r = run("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", input="[]")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == []


def test_missing_image_file_is_skipped(mini, tmp_path):
    root, gt, ids, boxes = mini
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(root / "images" / f"{ids[0]:012d}.jpg", imgs)
    two = [b for b in boxes if b["image_id"] in ids[:2]]
    (tmp_path / "b.json").write_text(json.dumps(two))
    r = run("--boxes", tmp_path / "b.json", "--images", imgs, "--ann", root / "instances.json")
    assert r.exit_code == 0, r.output
    n_missing = sum(b["image_id"] == ids[1] for b in two)
    assert f"image file missing or corrupt: {n_missing}" in r.stderr
    assert len(json.loads(r.stdout)) == len(two) - n_missing


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", "malformed JSON at line 1 column"),
        ("missing_field", "record 1: missing field 'score'"),
        ("no_images_dir", "no such directory"),
        ("ann_without_images", "has none of the images"),
        ("both_inputs", "exactly one of --boxes, --points and --everything"),
        ("resume_stdout", "--resume needs --out FILE"),
        ("bad_pth", "not a readable torch file"),
        ("detector_needs_category", "missing field 'category_id'"),
        ("unknown_model", "unknown model 'no-such-model'"),
        ("unknown_vocab", "unknown vocabulary 'bogus'"),
        ("bad_device", "Invalid value for --device: 'gpu0'"),
        ("checkpoint_syntax", "'clip2sam': expected COMPONENT=PATH"),
        ("checkpoint_component", "unknown component 'sam' (this model has: sam2clip, clip2sam, prompt_encoder)"),
        ("compile_on_cpu", "--compile needs a CUDA device"),
    ],
)
def test_bad_inputs(case, message, mini, tmp_path):
    root, gt, ids, boxes = mini
    good = tmp_path / "good.json"
    good.write_text(json.dumps(boxes[:2]))
    args = {
        "malformed": ["--boxes", "-"],
        "missing_field": ["--boxes", "-", "--strict"],
        "no_images_dir": ["--boxes", good],
        "ann_without_images": ["--boxes", "-"],
        "both_inputs": ["--boxes", good, "--points", good],
        "resume_stdout": ["--boxes", good, "--resume"],
        "bad_pth": ["--boxes", tmp_path / "x.pth"],
        "detector_needs_category": ["--boxes", "-", "--label-source", "detector"],
        "unknown_model": ["--boxes", good, "--model", "no-such-model"],
        "unknown_vocab": ["--boxes", good, "--vocab", "bogus"],
        "bad_device": ["--boxes", good, "--device", "gpu0"],
        "checkpoint_syntax": ["--boxes", good, "--checkpoint", "clip2sam"],
        "checkpoint_component": ["--boxes", good, "--checkpoint", "sam=x.pth"],
        "compile_on_cpu": ["--boxes", good, "--compile"],
    }[case]
    stdin = {
        "malformed": '[{"image_id": 1,, }]',
        "missing_field": json.dumps([boxes[0], {"image_id": 1, "bbox": [1, 1, 2, 2]}]),
        "ann_without_images": json.dumps([{**boxes[0], "image_id": 123456789}]),
        "detector_needs_category": json.dumps([{k: v for k, v in boxes[0].items() if k != "category_id"}]),
    }.get(case)
    (tmp_path / "x.pth").write_bytes(b"garbage")
    images = tmp_path / "nope" if case == "no_images_dir" else root / "images"
    r = run(*args, "--images", images, "--ann", root / "instances.json", input=stdin)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


@pytest.mark.gpu
def test_cuda_end_to_end_bf16_matches_fp32(mini, tmp_path):
    from pycocotools import mask as mask_utils

    root, gt, ids, boxes = mini
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    outs = {}
    for name, extra in (("bf16", []), ("fp32", ["--no-amp"])):
        out = tmp_path / f"{name}.json"
        r = run("--boxes", tmp_path / "boxes.json", "--images", root / "images", "--ann", root / "instances.json",
                "--out", out, "--workers", 2, "-q", *extra, device="cuda")
        assert r.exit_code == 0, r.output
        outs[name] = json.loads(out.read_text())
        assert len(outs[name]) == len(boxes)
    _check_loadable(outs["bf16"], gt, tmp_path)
    ious = []
    for a, b in zip(outs["bf16"], outs["fp32"]):
        ra, rb = a["segmentation"], b["segmentation"]
        if mask_utils.area(ra) == 0 and mask_utils.area(rb) == 0:
            ious.append(1.0)
        else:
            ious.append(float(mask_utils.iou([ra], [rb], [0])[0][0]))
    assert sum(ious) / len(ious) >= 0.98


def _broken_images(tmp_path, root, ids) -> Path:
    """ids[0] missing, ids[1] the picture of ids[2] (another size than --ann says), ids[2] as is."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good = root / "images" / f"{ids[2]:012d}.jpg"
    shutil.copy(good, imgs)
    shutil.copy(good, imgs / f"{ids[1]:012d}.jpg")
    with Image.open(root / "images" / f"{ids[1]:012d}.jpg") as a, Image.open(good) as b:
        assert a.size != b.size  # the copy really is of the wrong size
    return imgs


def test_unreadable_images_with_out_file_merge_and_resume(mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    imgs = _broken_images(tmp_path, root, ids)
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    args = ["--boxes", tmp_path / "b.json", "--images", imgs, "--ann", root / "instances.json", "--batch-size", 1]
    ref = tmp_path / "ref.json"
    r = run(*args, "--out", ref)
    assert r.exit_code == 0, r.output
    n = {i: sum(b["image_id"] == i for b in boxes) for i in ids}
    assert f"image file missing or corrupt: {n[ids[0]]}" in r.stderr
    assert f"image size differs from --ann: {n[ids[1]]}" in r.stderr
    results = json.loads(ref.read_text())
    assert {x["image_id"] for x in results} == {ids[2]} and len(results) == n[ids[2]]
    assert not list(tmp_path.glob("*.partial*"))
    # interrupted after the two unusable images were recorded: --resume finishes the run
    out = tmp_path / "out.json"
    _interrupt_after(monkeypatch, 0)
    r = run(*args, "--out", out, "-q")
    assert r.exit_code == 130, r.output
    part = [json.loads(line) for line in (tmp_path / "out.json.partial.jsonl").read_text().splitlines()]
    part = [e for e in part if "image" in e]
    assert [(e["image"]["id"], e["n"], e["skipped"]) for e in part] == [
        (ids[0], 0, "image file missing or corrupt"), (ids[1], 0, "image size differs from --ann")]
    monkeypatch.undo()
    monkeypatch.setattr(api_mod, "load_predictor", lambda settings, vocabulary=None: _cache[_key(settings, vocabulary)])
    r = run(*args, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()
    assert f"image file missing or corrupt: {n[ids[0]]}" in r.stderr  # still counted after --resume


def test_dataset_lists_filtered_images_not_unreadable_ones(mini, tmp_path):
    """--format dataset: an image whose detections were all filtered out is listed with no
    annotations; an unreadable image is not listed. Same output through --out - and --out FILE."""
    root, gt, ids, boxes = mini
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in ids[1:]:
        shutil.copy(root / "images" / f"{i:012d}.jpg", imgs)
    low = [dict(b, score=0.1) if b["image_id"] == ids[1] else b for b in boxes]
    (tmp_path / "b.json").write_text(json.dumps(low))
    args = ["--boxes", tmp_path / "b.json", "--images", imgs, "--ann", root / "instances.json",
            "--format", "dataset", "--score-thr", 0.5, "-q"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "ds.json"
    r2 = run(*args, "--out", out)
    assert r2.exit_code == 0, r2.output
    assert out.read_text() == r.stdout
    ds = json.loads(r.stdout)
    assert [im["id"] for im in ds["images"]] == [ids[1], ids[2]]
    assert {a["image_id"] for a in ds["annotations"]} == {ids[2]}
    assert len(ds["annotations"]) == sum(b["image_id"] == ids[2] for b in boxes)
    results = json.loads(run(*[a for a in args if a not in ("--format", "dataset")]).stdout)  # results: same records
    assert len(results) == len(ds["annotations"])


def _custom_dataset(tmp_path, root, gt, ids) -> tuple[Path, Path]:
    """A dataset of the mini images with two classes of its own (ids 101, 102) and boxes of it."""
    custom = copy.deepcopy(gt)
    custom["categories"] = [{"id": 101, "name": "apple"}, {"id": 102, "name": "zebra crossing"}]
    for i, a in enumerate(custom["annotations"]):
        a["category_id"] = 101 + i % 2
    ann = tmp_path / "custom.json"
    ann.write_text(json.dumps(custom))
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in custom["annotations"] if a["image_id"] == ids[0] and not a["iscrowd"]]
    (tmp_path / "custom_boxes.json").write_text(json.dumps(boxes))
    return ann, tmp_path / "custom_boxes.json"


def test_vocabulary_defaults_to_ann_categories(mini, tmp_path):
    root, gt, ids, _ = mini
    ann, boxes = _custom_dataset(tmp_path, root, gt, ids)
    r = run("--boxes", boxes, "--images", root / "images", "--ann", ann, "--format", "dataset")
    assert r.exit_code == 0, r.output
    ds = json.loads(r.stdout)
    assert [(c["id"], c["name"]) for c in ds["categories"]] == [(101, "apple"), (102, "zebra crossing")]
    assert ds["annotations"] and {a["category_id"] for a in ds["annotations"]} <= {101, 102}
    assert all({t["category_id"] for t in a["topk"]} <= {101, 102} for a in ds["annotations"])
    assert f"categories of --ann {ann}" in r.stderr and "vocabulary:" in r.stderr
    assert "warning" not in r.stderr
    # --vocab wins, with one warning line: COCO ids mean nothing (101/102) in this --ann
    r = run("--boxes", boxes, "--images", root / "images", "--ann", ann, "--vocab", "coco")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "80 of 80 --vocab classes" in warnings[0] and "1 (person)" in warnings[0]
    assert {x["category_id"] for x in json.loads(r.stdout)} <= set(range(1, 91))
    # without --ann: the model's default vocabulary (tiny: coco)
    r = run("--boxes", boxes, "--images", root / "images", "--label-source", "ovsam")
    assert r.exit_code == 0, r.output
    assert "the model's default" in r.stderr


@pytest.mark.parametrize("change", ["weights", "roi_box", "vocab_file"])
def test_resume_refuses_other_weights_roi_box_or_vocab_file(change, mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    names = tmp_path / "names.txt"
    names.write_text("person\ncar\n")
    args = ["--boxes", tmp_path / "b.json", "--images", root / "images", "--ann", root / "instances.json",
            "--batch-size", 1, "-q", "--out", tmp_path / "out.json"]
    if change == "vocab_file":
        args += ["--vocab", names]
    # a run interrupted after one image, by a predictor that fails on its second batch
    calls = {"n": 0}
    real = api_mod.load_predictor

    def interrupting(settings, vocabulary=None):
        predictor = real(settings, vocabulary)
        original = predictor.predict_prepared

        def flaky(images, prompts, **kwargs):
            calls["n"] += 1
            if calls["n"] > 1:
                raise KeyboardInterrupt
            return original(images, prompts, **kwargs)

        monkeypatch.setattr(predictor, "predict_prepared", flaky)
        return predictor

    monkeypatch.setattr(api_mod, "load_predictor", interrupting)
    assert run(*args).exit_code == 130
    monkeypatch.undo()
    monkeypatch.setattr(api_mod, "load_predictor", lambda settings, vocabulary=None: _real_load(settings, vocabulary))
    extra = []
    if change == "weights":
        monkeypatch.setattr(api_mod, "load_predictor", _with_other_weights)
    elif change == "roi_box":
        extra = ["--roi-box", "prompt"]
    else:
        names.write_text("person\nbicycle\n")
    r = run(*args, *extra, "--resume")
    assert r.exit_code == 2, r.output
    named = {"weights": "weights (sha256)", "roi_box": "--roi-box (mask → prompt)", "vocab_file": "--vocab (file sha256)"}
    assert "written with other options" in r.stderr and named[change] in r.stderr and "Traceback" not in r.output


def _with_other_weights(settings, vocabulary=None):
    predictor = _real_load(settings, vocabulary)
    predictor.weights_sha256 = {"clip2sam": "1" * 64}
    return predictor


def test_roi_box_reaches_the_model(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes[:2]))
    r = run("--boxes", tmp_path / "b.json", "--images", root / "images", "--roi-box", "prompt", "-q")
    assert r.exit_code == 0, r.output
    [(key, predictor)] = [(k, p) for k, p in _cache.items() if k[4] == "prompt"]
    assert predictor.model.cfg.roi_box == "prompt"
    bad = run("--boxes", tmp_path / "b.json", "--images", root / "images", "--roi-box", "box")
    assert bad.exit_code == 2 and "--roi-box" in bad.output


def test_broken_stdout_pipe_exits_quietly(mini, tmp_path, monkeypatch):
    """`ovsam label --out - | head`: no error message, exit code 141 (128 + SIGPIPE)."""
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes[:2]))

    def closed_pipe(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(JsonFileFormat, "write", closed_pipe)
    r = run("--boxes", tmp_path / "b.json", "--images", root / "images")
    assert r.exit_code == 141, r.output
    assert "error" not in r.stderr and "Broken pipe" not in r.output


def test_help_texts(mini):
    import re

    r = CliRunner().invoke(app, ["label", "--help"], env={"COLUMNS": "200"})
    text = re.sub(r"[\s│]+", " ", r.output)
    assert "CVAT" in text and "needs RLE" not in text and "outer contours" in text
    assert "--roi-box" in text and "categories of --ann" in text


def test_progress_counts_prompts_on_points_runs(mini, tmp_path):
    root, gt, ids, boxes = mini
    b = next(b for b in boxes if b["image_id"] == ids[0])
    x, y, w, h = b["bbox"]
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": ids[0], "points": [[x + w / 2, y + h / 2]], "labels": [1]}]))
    r = run("--points", tmp_path / "p.json", "--images", root / "images")
    assert r.exit_code == 0, r.output
    assert "1 prompts" in r.stderr and "boxes" not in r.stderr
