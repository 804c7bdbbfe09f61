"""`ovsam label --everything`: segment-anything's generator steps, OVSAM naming, engine integration.

Two models: `tiny` (the real architecture, random weights) on real COCO images, for the whole
path and the stability score; and `ColourOracle`, a `ChunkedPredictor` whose mask for a click
is the region of the clicked colour, on drawn images, so that duplicates, crop borders, labels
and background have known answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import build_all_layer_point_grids, calculate_stability_score, generate_crop_boxes
from test_cli_label import cached_model, mini  # noqa: F401  (fixtures: cached tiny models, the mini-val data)
from torchvision.ops import box_iou
from typer.testing import CliRunner

from ovsam_cli.main import app
from ovsam_model.chunked import ChunkedPredictor, ChunkOutput, ModelPrompts
from ovsam_model.everything import EverythingGenerator, EverythingSettings, prepare_everything
from ovsam_model.io.masks import decode_rle
from ovsam_model.labeling import label_images, open_labeler
from ovsam_model.transforms import iter_mask_logits
from ovsam_model.types import Prompts
from ovsam_model.vocab import Vocabulary

# What the tiny model's random weights need to give records at all (its logits are ~±0.05).
TINY_OPEN = ["--stability-score-thresh", "0", "--stability-score-offset", "0.01", "--keep-background"]

# --- the colour oracle -----------------------------------------------------------------------

PALETTE = {  # colour → vocabulary index (None: background)
    (0, 0, 0): None,
    (255, 0, 0): 0,
    (0, 255, 0): 1,
    (0, 0, 255): 2,
    (255, 255, 0): 3,
}


class ColourOracle(ChunkedPredictor):
    """A click's mask is every pixel of the clicked colour (logits ±10 on SAM's low-res grid);
    its label is the colour's class (p 0.8), black is background (p 0.9)."""

    def __init__(self, size: int = 256) -> None:
        names = ["red", "green", "blue", "yellow"]
        vocabulary = Vocabulary("colours", names, [[n] for n in names], [11, 12, 13, 14])
        super().__init__(vocabulary, device="cpu", image_size=size, box_chunk=64, topk=2, mask_postprocess="fast",
                         weights_sha256={}, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
        self.decoded = 0

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def _decode_chunk(self, feats, index, prompts: ModelPrompts, input_size) -> ChunkOutput:
        image = feats[index]
        xy = prompts.points[:, 0, :].long().clamp(0, self.image_size - 1)
        colours = image[:, xy[:, 1], xy[:, 0]].T  # [n, 3]
        same = (image[None] - colours[:, :, None, None]).abs().amax(dim=1) < 0.5
        low_res = (F.avg_pool2d(same.float()[:, None], 4) - 0.5) * 20
        probs = torch.full((len(xy), 4), 0.2 / 3)
        background = torch.full((len(xy),), 0.05)
        for i, c in enumerate(colours.round().long().tolist()):
            cls = PALETTE.get(tuple(c), None)
            if cls is None:
                probs[i] = 0.01
                background[i] = 0.9
            else:
                probs[i, cls] = 0.8
        self.decoded += len(xy)
        return ChunkOutput(low_res=low_res, probs=probs, background=background)


def shapes_image(width: int = 320, height: int = 240) -> np.ndarray:
    """Black background, a red and a blue rectangle, a green one with a 6×6 black hole."""
    image = np.zeros((height, width, 3), np.uint8)
    image[20:110, 20:140] = (255, 0, 0)
    image[130:220, 40:130] = (0, 255, 0)
    image[172:178, 82:88] = 0
    image[40:200, 180:300] = (0, 0, 255)
    return image


def masks_of(result) -> list[np.ndarray]:
    return [decode_rle(r) for r in result.rles]


def colour_of(image: np.ndarray, mask: np.ndarray) -> tuple:
    values, counts = np.unique(image[mask].reshape(-1, 3), axis=0, return_counts=True)
    return tuple(int(v) for v in values[counts.argmax()])


# --- segment-anything's own steps ---------------------------------------------------------------


@pytest.mark.parametrize("layers,downscale", [(0, 1), (1, 2), (2, 1)])
def test_point_grids_and_crop_boxes_are_segment_anythings(layers, downscale):
    settings = EverythingSettings(points_per_side=8, crop_n_layers=layers, crop_n_points_downscale_factor=downscale)
    ours = settings.point_grids()
    ref = build_all_layer_point_grids(8, layers, downscale)
    assert len(ours) == len(ref) and all(np.array_equal(a, b) for a, b in zip(ours, ref))
    image = shapes_image()
    prepared = prepare_everything(image, prepare=ColourOracle().prepare, crop_n_layers=layers,
                                  crop_overlap_ratio=settings.crop_overlap_ratio)
    boxes, layer_idx = generate_crop_boxes(image.shape[:2], layers, settings.crop_overlap_ratio)
    assert prepared.crop_boxes == boxes and prepared.layers == layer_idx
    assert [c.original_size for c in prepared.crops] == [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in boxes]
    assert settings.points_per_image() == sum(len(ref[layer]) for layer in layer_idx)


def test_every_click_is_decoded_at_segment_anythings_grid_points():
    """Nothing filtered: one record per grid point, at the points `build_all_layer_point_grids`
    scaled to the image gives."""
    oracle = ColourOracle()
    settings = EverythingSettings(points_per_side=6, stability_score_thresh=0.0, box_nms_thresh=1.0, max_masks=0,
                                  drop_background=False)
    image = shapes_image()
    result = EverythingGenerator(oracle, settings).generate(image)
    expected = build_all_layer_point_grids(6, 0, 1)[0] * np.array([[image.shape[1], image.shape[0]]])
    # box NMS at IoU 1.0 still merges identical boxes: every point is decoded, duplicates of one
    # region may go; each kept point is a grid point, and every region is found
    assert oracle.decoded == len(expected)
    got = result.points.numpy()
    assert all(np.isclose(expected, p, atol=1e-3).all(axis=1).any() for p in got)
    assert len(result) <= len(expected)


def test_stability_score_is_segment_anythings_on_the_same_logits(mini, tmp_path):
    root, gt, ids, _ = mini
    from ovsam_model.labeling.api import ModelSettings, load_predictor

    predictor = load_predictor(ModelSettings(model="tiny", device="cpu"))
    settings = EverythingSettings(points_per_side=3, stability_score_thresh=0.0, stability_score_offset=0.01,
                                  drop_background=False, box_nms_thresh=1.0)
    image = np.asarray(Image.open(root / "images" / f"{ids[0]:012d}.jpg").convert("RGB"))
    result = EverythingGenerator(predictor, settings).generate(image)
    assert len(result) > 0
    crop = predictor.prepare(image)
    grid = build_all_layer_point_grids(3, 0, 1)[0] * np.array([[image.shape[1], image.shape[0]]])
    with torch.inference_mode():  # the generator's one batch of 9 clicks, decoded again
        prompts = ModelPrompts.of(Prompts(points=grid[:, None], point_labels=np.ones((9, 1))), crop, predictor.device)
        stage = predictor.decode_masks(predictor.encode([crop]), 0, prompts, crop.input_size)
        logits = next(iter_mask_logits(stage.low_res, crop.input_size, crop.original_size, predictor.image_size))
    ref = calculate_stability_score(logits, 0.0, 0.01)
    for i in range(len(result)):
        row = int(np.isclose(grid, result.points[i].numpy(), atol=1e-3).all(axis=1).nonzero()[0][0])
        assert float(result.stability[i]) == float(ref[row])
        assert np.array_equal(decode_rle(result.rles[i]), (logits[row] > 0).numpy())


# --- filtering with known answers ---------------------------------------------------------------


def test_one_mask_per_object_with_its_label_and_background_dropped():
    image = shapes_image()
    result = EverythingGenerator(ColourOracle(), EverythingSettings(points_per_side=8)).generate(image)
    colours = [colour_of(image, m) for m in masks_of(result)]
    assert sorted(colours) == sorted([(255, 0, 0), (0, 255, 0), (0, 0, 255)])  # no duplicates, no background
    for colour, labels in zip(colours, result.topk_labels.tolist()):
        assert labels[0] == PALETTE[colour]
    assert torch.allclose(result.scores, result.stability * result.topk_scores[:, 0])
    assert (result.stability >= 0.95).all()
    assert result.scores.tolist() == sorted(result.scores.tolist(), reverse=True)
    kept = EverythingGenerator(ColourOracle(), EverythingSettings(points_per_side=8, drop_background=False)).generate(image)
    assert (0, 0, 0) in [colour_of(image, m) for m in masks_of(kept)]
    assert len(EverythingGenerator(ColourOracle(), EverythingSettings(points_per_side=8, min_label_prob=0.9)).generate(image)) == 0
    assert len(EverythingGenerator(ColourOracle(), EverythingSettings(points_per_side=8, max_masks=2)).generate(image)) == 2


def test_nms_leaves_no_two_boxes_above_the_threshold_and_masks_match_their_boxes():
    image = shapes_image()
    for thresh in (0.3, 0.7, 0.95):
        result = EverythingGenerator(ColourOracle(), EverythingSettings(points_per_side=8, box_nms_thresh=thresh,
                                                                        drop_background=False)).generate(image)
        iou = box_iou(result.boxes, result.boxes).fill_diagonal_(0)
        assert (iou <= thresh + 1e-6).all()
        for rle, box in zip(result.rles, result.boxes.tolist()):
            ys, xs = np.nonzero(decode_rle(rle))
            assert [xs.min(), ys.min(), xs.max(), ys.max()] == box  # segment-anything's inclusive box


def test_crop_layer_merges_crops_without_duplicates_at_borders():
    """The blue rectangle spans the layer-1 crop border: its partial masks touch the crop edge
    and are dropped, and the crops' copies of whole objects lose to one mask each."""
    image = shapes_image(480, 360)
    image[:] = 0
    image[20:80, 30:120] = (255, 0, 0)  # inside the top-left crop
    image[100:300, 150:350] = (0, 0, 255)  # across the middle
    image[250:340, 380:460] = (255, 255, 0)  # inside the bottom-right crop
    settings = EverythingSettings(points_per_side=8, crop_n_layers=1)
    result = EverythingGenerator(ColourOracle(), settings).generate(image)
    masks = masks_of(result)
    colours = [colour_of(image, m) for m in masks]
    assert sorted(colours) == sorted([(255, 0, 0), (0, 0, 255), (255, 255, 0)])
    for colour, mask in zip(colours, masks):  # each object whole (at the oracle's coarse logits), not a piece
        truth = (image == colour).all(axis=2)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    whole = [0, 0, image.shape[1], image.shape[0]]
    from_crop = {c: b != whole for c, b in zip(colours, result.crop_boxes.tolist())}
    # small objects come from the finer crops; the one cut by every crop border from the whole image
    assert from_crop == {(255, 0, 0): True, (0, 0, 255): False, (255, 255, 0): True}
    iou = box_iou(result.boxes, result.boxes).fill_diagonal_(0)
    assert (iou <= settings.crop_nms_thresh).all()


def test_min_mask_region_area_fills_small_holes():
    pytest.importorskip("cv2")
    image = shapes_image()
    green = (image == (0, 255, 0)).all(axis=2)
    oracle = ColourOracle(size=512)  # the 6-pixel hole survives SAM's 4× coarser logits
    plain = EverythingGenerator(oracle, EverythingSettings(points_per_side=8)).generate(image)
    filled = EverythingGenerator(oracle, EverythingSettings(points_per_side=8, min_mask_region_area=100)).generate(image)
    hole = np.zeros_like(green)
    hole[172:178, 82:88] = True

    def green_mask(result):
        return next(m for m in masks_of(result) if colour_of(image, m) == (0, 255, 0))

    assert not green_mask(plain)[hole].any()
    assert green_mask(filled)[hole].all()
    assert len(filled) == len(plain)


# --- the engine, the API and the CLI on real images ------------------------------------------


def label(*args):
    return CliRunner().invoke(app, ["label", "--everything", "--model", "tiny", "--device", "cpu", "--workers", "0",
                                    "--points-per-side", "4", *TINY_OPEN, *map(str, args)])


@pytest.fixture(scope="module")
def two_images(data_dir, tmp_path_factory):
    """A dataset JSON of two real images, and its --everything output (dataset format) by the CLI."""
    root = data_dir / "coco-val2017-mini"
    if not root.is_dir():
        pytest.skip("coco-val2017-mini not in the test data")
    gt = json.loads((root / "instances.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])[:2]
    tmp = tmp_path_factory.mktemp("everything")
    ann = tmp / "two.json"
    ann.write_text(json.dumps({"images": [im for im in gt["images"] if im["id"] in ids],
                               "categories": gt["categories"], "annotations": []}))
    out = tmp / "cli.json"
    r = label("--images", root / "images", "--ann", ann, "--out", out, "--format", "dataset", "-q")
    assert r.exit_code == 0, r.output
    return root, gt, ids, ann, out


def test_cli_records_on_real_images_are_valid(cached_model, two_images):
    root, gt, ids, ann, out = two_images
    data = json.loads(out.read_text())
    records = data["annotations"]
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    assert [im["id"] for im in data["images"]] == ids
    assert records and {r["image_id"] for r in records} <= set(ids)
    coco_ids = {c["id"] for c in gt["categories"]}  # the vocabulary of --ann
    for image_id in ids:
        mine = [r for r in records if r["image_id"] == image_id]
        assert len(mine) <= 16  # at most one mask per click
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
        if len(mine) > 1:
            assert (box_iou(boxes, boxes).fill_diagonal_(0) <= 0.7 + 1e-6).all()
        for rec in mine:
            mask = decode_rle(rec["segmentation"])
            assert mask.shape == sizes[image_id] and mask.any()
            assert rec["bbox"] == pytest.approx(mask_utils.toBbox(rec["segmentation"]).tolist(), abs=1e-3)
            assert rec["category_id"] in coco_ids and rec["category_id"] == rec["topk"][0]["category_id"]
            assert rec["score"] == pytest.approx(rec["stability_score"] * rec["topk"][0]["prob"], abs=2e-6)
            assert len(rec["point_coords"]) == 1 and len(rec["point_coords"][0]) == 2


def test_api_equals_cli_deterministically_and_ranks_merge_to_the_same_file(cached_model, two_images, tmp_path):
    root, gt, ids, ann, cli_out = two_images
    settings = EverythingSettings(points_per_side=4, stability_score_thresh=0.0, stability_score_offset=0.01,
                                  drop_background=False)
    api_out = tmp_path / "api.json"
    summary = label_images(root / "images", everything=settings, ann=ann, out=api_out, fmt="dataset", model="tiny",
                           device="cpu", workers=0)
    assert api_out.read_bytes() == cli_out.read_bytes()
    assert summary.images == len(ids) and summary.prompts == 16 * len(ids)
    sharded = tmp_path / "sharded.json"
    for rank in (1, 0):  # rank 0 merges once rank 1's part is finished
        label_images(root / "images", everything=settings, ann=ann, out=sharded, fmt="dataset", model="tiny",
                     device="cpu", workers=0, rank=rank, world=2)
    assert sharded.read_bytes() == cli_out.read_bytes()


def test_folder_without_ann_lists_its_images_and_a_resume_with_other_settings_is_refused(mini, tmp_path):
    root, gt, ids, _ = mini
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name, image_id in (("b.jpg", ids[0]), ("sub/a.jpg", ids[1])):
        (folder / name).write_bytes((root / "images" / f"{image_id:012d}.jpg").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    labeler = open_labeler(folder, everything=True, model="tiny", device="cpu", workers=0)
    assert labeler.image_ids == [1, 2]
    assert [labeler.images.get(i).file_name for i in (1, 2)] == ["b.jpg", "sub/a.jpg"]
    out = tmp_path / "out.json"
    part_run = label("--images", folder, "--out", out, "--format", "dataset", "-q")
    assert part_run.exit_code == 0, part_run.output
    listed = json.loads(out.read_text())["images"]
    assert [(im["id"], im["file_name"]) for im in listed] == [(1, "b.jpg"), (2, "sub/a.jpg")]
    # an interrupted run's part file with other settings: --resume names the changed option
    from ovsam_model.labeling.parts import part_path

    labeler = open_labeler(folder, everything=EverythingSettings(points_per_side=3), model="tiny", device="cpu", workers=0)
    from ovsam_model.labeling.parts import PartWriter

    PartWriter(part_path(out, 0, 1), labeler.fingerprint, labeler.options, resume=False).close()
    r = label("--images", folder, "--out", out, "--resume")
    assert r.exit_code != 0 and "--points-per-side" in r.output


@pytest.mark.parametrize("args,message", [
    (["--points-per-side", "0"], "--points-per-side must be at least 1"),
    (["--stability-score-thresh", "1.5"], "--stability-score-thresh must be within [0, 1]"),
    (["--box-nms-thresh", "-0.1"], "--box-nms-thresh must be within [0, 1]"),
    (["--min-label-prob", "2"], "--min-label-prob must be within [0, 1]"),
    (["--crop-overlap-ratio", "1"], "--crop-overlap-ratio must be within [0, 1)"),
    (["--label-source", "detector"], "cannot take --label-source detector"),
])
def test_bad_everything_options_are_one_line_errors(mini, tmp_path, args, message):
    root, gt, ids, _ = mini
    r = CliRunner().invoke(app, ["label", "--everything", "--model", "tiny", "--images", str(root / "images"),
                                 "--out", str(tmp_path / "o.json"), *args])
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "o.json").exists()


def test_everything_options_without_everything_and_two_sources_are_refused(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    common = ["label", "--model", "tiny", "--images", str(root / "images"), "--out", str(tmp_path / "o.json")]
    r = CliRunner().invoke(app, [*common, "--boxes", str(tmp_path / "b.json"), "--points-per-side", "8"])
    assert r.exit_code != 0 and "--points-per-side applies to --everything only" in r.output
    r = CliRunner().invoke(app, [*common, "--boxes", str(tmp_path / "b.json"), "--everything"])
    assert r.exit_code != 0 and "exactly one of --boxes, --points and --everything" in r.output


def test_everything_output_evaluates_as_proposals_and_as_detections(cached_model, two_images, tmp_path):
    """Class-agnostic recall equals pycocotools' COCOeval(useCats=0) on the same files, and the
    detector protocol's AP runs unchanged on everything-mode records."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, gt, ids, ann, out = two_images
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({**gt, "images": [im for im in gt["images"] if im["id"] in ids],
                                   "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}))
    results = [{k: v for k, v in a.items() if k not in ("id", "iscrowd")} for a in json.loads(out.read_text())["annotations"]]
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(results))
    r = CliRunner().invoke(app, ["eval", "--protocol", "proposals", "--ann", str(gt_file), "--pred", str(pred),
                                 "--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["result"]["metrics"]
    coco = COCO(str(gt_file))
    agnostic = [{**{k: v for k, v in p.items() if k != "bbox"}, "category_id": 1} for p in results]
    coco.dataset["categories"] = [{"id": 1, "name": "object"}]
    for a in coco.dataset["annotations"]:
        a["category_id"] = 1
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(agnostic), "segm")
    ev.params.useCats, ev.params.maxDets = 0, [1, 10, 100, 1000]
    ev.evaluate()
    ev.accumulate()
    recall = ev.eval["recall"][:, :, 0, 3]  # [iou, K=1, area all, maxDets 1000]
    assert metrics["AR@1000"] == pytest.approx(float(recall[recall > -1].mean()), abs=1e-9)
    r = CliRunner().invoke(app, ["eval", "--dataset", "coco", "--ann", str(gt_file), "--pred", str(pred),
                                 "--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    detected = json.loads(r.stdout)["result"]
    assert detected["num_predictions"] == len(results) and detected["num_images"] == len(ids)
    assert -1.0 <= detected["metrics"]["AP"] <= 1.0


def test_a_folder_without_images_is_a_one_line_error_and_skips_count_images(mini, tmp_path):
    root, gt, ids, _ = mini
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    r = label("--images", empty, "--out", tmp_path / "o.json")
    assert r.exit_code != 0 and "--everything found no images to label" in r.output
    assert not (tmp_path / "o.json").exists()
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "1.jpg").write_bytes((root / "images" / f"{ids[0]:012d}.jpg").read_bytes())
    (folder / "2.jpg").write_bytes(b"not a jpeg")
    r = label("--images", folder, "--out", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    assert "skipped 1 of 2 images: image file missing or corrupt: 1 (image_id 2)" in r.output
