"""Prompt protocol: oracle / box-as-mask predictors against hand computations; centre points."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ovsam_model.eval.prompt import centre_point, evaluate_prompts, mask_iou
from ovsam_model.splits import COCO_BASE, COCO_NOVEL
from ovsam_model.types import Prediction, Prompts

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MINI_DIR = DATA / "coco-val2017-mini"
MINI = MINI_DIR / "instances.json"
needs_mini = pytest.mark.skipif(not MINI.is_file(), reason=f"test data absent: {MINI}")


def _coco(gt: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
    return c


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class _FakePredictor:
    """Base for test predictors: knows each GT image by its pixels and the GT instances in file order."""

    def __init__(self, gt: dict, images_dir: Path, image_ids=None):
        self.coco = _coco(gt)
        self.category_ids = [c["id"] for c in gt["categories"]]
        self.class_names = [c["name"] for c in gt["categories"]]
        self.by_digest = {}
        for img in gt["images"]:
            if image_ids is not None and img["id"] not in image_ids:
                continue
            arr = np.asarray(Image.open(images_dir / img["file_name"]).convert("RGB"))
            self.by_digest[_digest(arr)] = img["id"]
        self.calls: list[int] = []

    def instances(self, image: np.ndarray) -> list[dict]:
        img_id = self.by_digest[_digest(image)]
        return [a for a in self.coco.imgToAnns[img_id] if not a["iscrowd"]]

    def predict(self, images, prompts):
        self.calls.append(len(images))
        out = []
        for image, p in zip(images, prompts):
            anns = self.instances(image)
            assert len(p) == len(anns)  # one prompt per non-crowd instance, in GT order
            masks, labels = self.answer(image, p, anns)
            n = len(anns)
            out.append(Prediction(masks=torch.as_tensor(np.stack(masks)).bool(),
                                  labels=torch.as_tensor(labels, dtype=torch.long), scores=torch.ones(n),
                                  topk_labels=torch.as_tensor(labels, dtype=torch.long)[:, None],
                                  topk_scores=torch.ones(n, 1)))
        return out


class _Oracle(_FakePredictor):
    """Returns each instance's GT mask and label; checks the prompts it gets."""

    def answer(self, image, p: Prompts, anns):
        masks = [self.coco.annToMask(a).astype(bool) for a in anns]
        if p.boxes is not None:
            x, y, w, h = np.array([a["bbox"] for a in anns], dtype=np.float32).T
            np.testing.assert_allclose(p.boxes.numpy(), np.stack([x, y, x + w, y + h], 1), rtol=0, atol=1e-3)
        else:
            assert p.points.shape == (len(anns), 1, 2) and bool((p.point_labels == 1).all())
            for (px, py), m in zip(p.points[:, 0].numpy(), masks):
                assert m[int(py), int(px)], "centre point outside its mask"
        return masks, [self.category_ids.index(a["category_id"]) for a in anns]


def _box_mask(box, shape) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    m = np.zeros(shape, dtype=bool)
    m[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
    return m


class _BoxAsMask(_FakePredictor):
    """Returns the prompt box filled as the mask, and always vocabulary index 0."""

    def answer(self, image, p: Prompts, anns):
        return [_box_mask(b, image.shape[:2]) for b in p.boxes.numpy()], [0] * len(anns)


@needs_mini
@pytest.mark.parametrize("prompt", ["box", "point"])
def test_oracle_gives_iou_one_and_full_accuracy(prompt):
    gt = json.loads(MINI.read_text())
    gt_before = copy.deepcopy(gt)
    oracle = _Oracle(gt, MINI_DIR / "images")
    res = evaluate_prompts(oracle, gt, MINI_DIR / "images", prompt=prompt, dataset="coco", batch_size=4,
                           progress=False)
    non_crowd = [a for a in gt["annotations"] if not a["iscrowd"]]
    crowd = len(gt["annotations"]) - len(non_crowd)
    assert crowd > 0
    assert res.num_skipped_crowd == crowd
    assert res.num_instances + res.num_skipped_empty == len(non_crowd)
    assert res.miou == pytest.approx(1.0) and res.miou_base == pytest.approx(1.0)
    assert res.miou_novel == pytest.approx(1.0)
    assert res.acc == 1.0 and res.acc_base == 1.0 and res.acc_novel == 1.0
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert res.num_base == sum(names[a["category_id"]] in COCO_BASE for a in non_crowd)
    assert res.num_novel == sum(names[a["category_id"]] in COCO_NOVEL for a in non_crowd)
    assert res.num_base + res.num_novel < res.num_instances  # the 15 excluded classes: overall only
    assert max(oracle.calls) <= 4 and sum(oracle.calls) == res.num_images
    assert gt == gt_before


@needs_mini
def test_box_as_mask_matches_hand_computation():
    gt = json.loads(MINI.read_text())
    coco = _coco(gt)
    image_ids = sorted(i for i in coco.imgs if any(not a["iscrowd"] for a in coco.imgToAnns[i]))[:12]
    pred = _BoxAsMask(gt, MINI_DIR / "images", set(image_ids))
    res = evaluate_prompts(pred, gt, MINI_DIR / "images", prompt="box", batch_size=5, max_images=12,
                           progress=False, model_name="box-as-mask")
    names = {c["id"]: c["name"] for c in gt["categories"]}
    ious = {"all": [], "base": [], "novel": []}
    hits = {"all": [], "base": [], "novel": []}
    for img_id in image_ids:
        for a in coco.imgToAnns[img_id]:
            if a["iscrowd"]:
                continue
            m = coco.annToMask(a).astype(bool)
            x, y, w, h = a["bbox"]
            b = _box_mask((x, y, x + w, y + h), m.shape)
            iou = np.logical_and(m, b).sum() / np.logical_or(m, b).sum()
            hit = float(a["category_id"] == gt["categories"][0]["id"])
            groups = ["all"] + (["base"] if names[a["category_id"]] in COCO_BASE else []) \
                + (["novel"] if names[a["category_id"]] in COCO_NOVEL else [])
            for g in groups:
                ious[g].append(iou)
                hits[g].append(hit)
    assert res.model == "box-as-mask" and res.num_images == 12
    assert res.num_instances == len(ious["all"])
    assert res.miou == pytest.approx(np.mean(ious["all"]), abs=1e-12)
    assert res.miou_base == pytest.approx(np.mean(ious["base"]), abs=1e-12)
    assert res.miou_novel == pytest.approx(np.mean(ious["novel"]), abs=1e-12)
    assert res.acc == pytest.approx(np.mean(hits["all"]))
    assert res.acc_base == pytest.approx(np.mean(hits["base"]))
    assert 0.3 < res.miou < 0.95


@needs_mini
def test_lvis_groups_come_from_frequency():
    gt = json.loads(MINI.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    for i, c in enumerate(gt["categories"]):
        c["frequency"] = "rcf"[i % 3]
    for img in gt["images"]:
        del img["file_name"]  # LVIS v1 image records locate files through coco_url only
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    pred = _Oracle(json.loads(MINI.read_text()), MINI_DIR / "images")
    res = evaluate_prompts(pred, gt, MINI_DIR / "images", prompt="box", dataset="lvis", batch_size=8,
                           max_images=6, progress=False)
    coco = _coco(gt)
    kept = [a for i in sorted(coco.imgs)[:6] for a in coco.imgToAnns[i]]
    assert res.num_instances == len(kept)
    assert res.num_novel == sum(freq[a["category_id"]] == "r" for a in kept)
    assert res.num_base == sum(freq[a["category_id"]] in "cf" for a in kept)
    assert res.num_base + res.num_novel == res.num_instances
    assert res.miou == pytest.approx(1.0) and res.acc == 1.0


def _brute_force_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each pixel centre to the nearest outside pixel (image border = outside)."""
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded)
    dist = np.zeros(mask.shape)
    for r, c in np.argwhere(mask):
        dist[r, c] = np.sqrt(((outside - (r + 1, c + 1)) ** 2).sum(1)).min()
    return dist


@pytest.mark.parametrize("seed", range(6))
def test_centre_point_maximises_distance_to_border(seed):
    rng = np.random.default_rng(seed)
    h, w = 17, 23
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(3):  # union of random rectangles, some touching the image border
        y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
        mask[y0:y0 + rng.integers(3, 12), x0:x0 + rng.integers(3, 14)] = True
    mask[rng.integers(0, h), :] = False  # a cut so that shapes are not convex
    if not mask.any():
        mask[5:9, 5:9] = True
    x, y = centre_point(mask)
    assert (x % 1, y % 1) == (0.0, 0.0)  # a pixel index: SAM's encoder adds the +0.5
    r, c = int(y), int(x)
    assert mask[r, c]
    brute = _brute_force_distance(mask)
    assert brute[r, c] == pytest.approx(brute.max(), abs=1e-4)
    assert centre_point(mask) == (x, y)  # deterministic


def test_centre_point_of_a_bar_touching_the_border():
    mask = np.zeros((9, 12), dtype=bool)
    mask[0:3, :] = True  # the image border counts as border: the centre is row 1, not row 0
    x, y = centre_point(mask)
    assert int(y) == 1
    assert int(x) == 1 + int(np.argmax(_brute_force_distance(mask)[1, 1:]))  # first maximum


def test_mask_iou_equals_pycocotools():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 30, 40)) > 0.5
    ref = mask_utils.iou([mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))],
                         [mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))], [0])[0, 0]
    assert mask_iou(a, b) == pytest.approx(ref, abs=1e-12)


@needs_mini
def test_bad_predictor_output_is_an_error():
    gt = json.loads(MINI.read_text())

    class _TooFew(_Oracle):
        def predict(self, images, prompts):
            return super().predict(images, prompts)[:-1]

    with pytest.raises(ValueError, match="predictions for"):
        evaluate_prompts(_TooFew(gt, MINI_DIR / "images"), gt, MINI_DIR / "images", batch_size=2, max_images=2,
                         progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate_prompts(_Oracle(gt, MINI_DIR / "images"), gt, MINI_DIR, max_images=1, progress=False)


class _PreparedRecorder:
    """A real tiny predictor (random weights) that records what `predict_prepared` receives."""

    def __init__(self, inner):
        self.inner, self.category_ids, self.device = inner, inner.category_ids, inner.device
        self.prepare = inner.prepare
        self.calls: list[list[tuple]] = []

    def predict_prepared(self, images, prompts):
        self.calls.append([(im.original_size, hashlib.sha1(im.pixels.numpy().tobytes()).hexdigest(), len(p))
                           for im, p in zip(images, prompts)])
        return self.inner.predict_prepared(images, prompts)

    def predict(self, images, prompts):  # pragma: no cover - the prepared path must be taken
        raise AssertionError("predict called although the predictor prepares")


@needs_mini
def test_workers_give_the_same_report_as_the_main_process(tmp_path):
    """Images, GT masks and prompts made in 2 DataLoader workers: same calls in the same order
    (prepared pixels in the workers) and the same report as in this process, on real images
    with a short last batch; the oracle (raw images) agrees too."""
    from ovsam_model.builder import build_predictor

    gt = json.loads(MINI.read_text())
    tiny = build_predictor("tiny", vocab="coco", random_weights=True, cache_dir=tmp_path, progress=False)
    runs = {}
    for workers in (0, 2):
        rec = _PreparedRecorder(tiny)
        res = evaluate_prompts(rec, gt, MINI_DIR / "images", prompt="point", batch_size=3, max_images=4,
                               progress=False, workers=workers)
        runs[workers] = (res.to_json(), rec.calls)
    assert runs[2] == runs[0]
    report, calls = runs[0]
    assert [len(c) for c in calls] == [3, 1] and report["num_images"] == 4
    assert 0 < report["miou"] < 1  # a real, image-dependent figure (not all 0 or all 1)
    oracle = {w: evaluate_prompts(_Oracle(gt, MINI_DIR / "images"), gt, MINI_DIR / "images", batch_size=4,
                                  max_images=6, progress=False, workers=w).to_json() for w in (0, 2)}
    assert oracle[2] == oracle[0] and oracle[0]["miou"] == pytest.approx(1.0)


@needs_mini
def test_image_errors_from_workers_keep_their_type_and_message():
    gt = json.loads(MINI.read_text())
    with pytest.raises(FileNotFoundError, match=r"^image \d+ not found"):
        evaluate_prompts(_Oracle(gt, MINI_DIR / "images"), gt, MINI_DIR, max_images=2, progress=False, workers=2)
