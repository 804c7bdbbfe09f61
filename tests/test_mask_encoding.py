"""`mask_format="rle"`: the same COCO RLEs as encoding the bool masks, produced a few masks at a time.

References: `io.masks.encode_rle` of the predictor's own bool masks (byte-identical dicts), and
for OVSAM the bool masks themselves against `masks_to_original_*` of the decoder's low-res logits.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from ovsam_model import chunked
from ovsam_model.builder import build_predictor
from ovsam_model.io.masks import (decode_rle, encode_rle, encode_rle_wh, mask_polygons, mask_stats_wh, rle_area,
                                  rle_bbox)
from ovsam_model.transforms import mask_step, masks_to_original_exact, masks_to_original_fast, prepare_image
from ovsam_model.types import Prompts

PREDICTORS = [("tiny", "fast"), ("tiny", "exact"), ("baseline-image-crop:tiny", "fast"),
              ("baseline-feature-crop:tiny", "exact")]


@pytest.fixture(scope="module")
def images(data_dir):
    paths = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:2]
    return [np.array(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture(scope="module")
def large_image(images):
    """A real photo resized to 3000×2000 (6 MP): the pixel budget allows 5 fast masks per step."""
    return np.array(Image.fromarray(images[0]).resize((3000, 2000), Image.BILINEAR))


@pytest.fixture(scope="module")
def predictor_for():
    """(name, post-processing, box_chunk) → a predictor with random weights, built once per name."""
    built: dict = {}

    def get(name: str, postprocess: str, box_chunk: int):
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_predictor(name, random_weights=True)
        predictor = built[name]
        predictor.mask_postprocess, predictor.box_chunk = postprocess, box_chunk
        return predictor

    return get


def _boxes(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w * 0.7, h * 0.7], size=(n, 2))
    wh = rng.uniform(0.05, 0.3, size=(n, 2)) * [w, h]
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)


def _points(h: int, w: int) -> Prompts:
    return Prompts(points=[[[w / 2, h / 2], [10.0, 10.0]], [[w / 3, h / 3], [w / 2, h / 2]], [[w - 5, h - 5], [0, 0]]],
                   point_labels=[[1, 0], [1, 1], [1, -1]])


def _assert_same_predictions(bool_out, rle_out):
    assert len(bool_out) == len(rle_out)
    for b, r in zip(bool_out, rle_out):
        assert r.masks is None and b.rles is None
        assert len(r) == len(b) == len(r.rles)
        assert r.rles == encode_rle(b.masks)  # byte-identical counts, same size
        for field in ("labels", "scores", "topk_labels", "topk_scores"):
            assert torch.equal(getattr(b, field), getattr(r, field)), field
        assert b.mask_areas is None and b.mask_boxes is None
        if r.mask_areas is not None or len(r) == 0:  # measured on the device (forced on CPU by the tests that check it)
            assert r.mask_areas == rle_area(r.rles) and r.mask_boxes == rle_bbox(r.rles)  # pycocotools, same RLEs


@contextlib.contextmanager
def _stats_on_device(predictor):
    """Areas and boxes of "rle" masks measured where the masks are, as on a GPU (a CPU leaves them to pycocotools)."""
    predictor.mask_stats_on_device = True
    try:
        yield
    finally:
        predictor.mask_stats_on_device = False


@pytest.mark.parametrize("name, postprocess", PREDICTORS)
def test_rle_equals_encoded_bool_masks(name, postprocess, images, predictor_for):
    """Boxes in chunks of 4 (10 boxes: 4 + 4 + 2), points with a negative and a padding click,
    and an image without prompts, all in one call."""
    predictor = predictor_for(name, postprocess, box_chunk=4)
    (h0, w0), (h1, w1) = images[0].shape[:2], images[1].shape[:2]
    prompts = [Prompts(boxes=_boxes(10, h0, w0, 0)), _points(h1, w1), Prompts(boxes=np.zeros((0, 4)))]
    prepared = [predictor.prepare(im) for im in (images[0], images[1], images[1])]
    bool_out = predictor.predict_prepared(prepared, prompts)
    rle_out = predictor.predict_prepared(prepared, prompts, mask_format="rle")
    _assert_same_predictions(bool_out, rle_out)
    with _stats_on_device(predictor):
        measured = predictor.predict_prepared(prepared, prompts, mask_format="rle")
    _assert_same_predictions(bool_out, measured)
    assert [len(m.mask_areas) for m in measured] == [10, 3, 0]
    assert [len(o) for o in rle_out] == [10, 3, 0]
    assert rle_out[0].rles[0]["size"] == [h0, w0] and isinstance(rle_out[0].rles[0]["counts"], str)
    assert bool_out[2].masks.shape == (0, h1, w1) and rle_out[2].rles == []
    assert any(m.any() for m in bool_out[0].masks) and not all(m.all() for m in bool_out[0].masks)


@pytest.mark.parametrize("postprocess, reference", [("fast", masks_to_original_fast), ("exact", masks_to_original_exact)])
def test_bool_masks_equal_the_postprocessed_decoder_logits(postprocess, reference, images, predictor_for):
    """The bool path (what the RLEs are checked against) is the decoder's logits > 0 at the
    original size, mask for mask."""
    predictor = predictor_for("tiny", postprocess, box_chunk=16)
    h, w = images[0].shape[:2]
    boxes = _boxes(7, h, w, 3)
    prepared = predictor.prepare(images[0])
    out = predictor.predict_prepared([prepared], [Prompts(boxes=boxes)])[0]
    chunk = chunked.ModelPrompts.of(Prompts(boxes=boxes), prepared, predictor.device)
    pixels = prepare_image(images[0], predictor.image_size, predictor.pixel_mean, predictor.pixel_std).pixels
    with torch.inference_mode():
        feats = predictor.model.encode_images(pixels[None])
        low = predictor.model.decode(feats, 0, boxes=chunk.boxes, input_size=prepared.input_size).mask_logits
    expected = reference(low.float(), prepared.input_size, prepared.original_size)[:, 0] > 0
    assert torch.equal(out.masks, expected)


@pytest.mark.parametrize("postprocess", ["fast", "exact"])
def test_large_image_is_encoded_a_few_masks_at_a_time(postprocess, large_image, monkeypatch, predictor_for):
    """3000×2000: each chunk of 8 boxes takes several budget-bounded steps, every step is encoded
    on its own, and the RLEs still equal those of the whole bool masks."""
    predictor = predictor_for("tiny", postprocess, box_chunk=8)
    h, w = large_image.shape[:2]
    step = mask_step((h, w), predictor.image_size, postprocess)
    assert 1 <= step < 8
    encoded: list[int] = []

    def recording(masks_wh):
        encoded.append(masks_wh.shape[0])
        return encode_rle_wh(masks_wh)

    monkeypatch.setattr(chunked, "encode_rle_wh", recording)
    prompts = [Prompts(boxes=_boxes(11, h, w, 1))]
    prepared = [predictor.prepare(large_image)]
    rle_out = predictor.predict_prepared(prepared, prompts, mask_format="rle")
    per_chunk = [min(step, n - s) for n in (8, 3) for s in range(0, n, step)]
    assert encoded == per_chunk and max(encoded) <= step
    bool_out = predictor.predict_prepared(prepared, prompts)
    _assert_same_predictions(bool_out, rle_out)


def test_images_without_prompts_only(images, predictor_for):
    predictor = predictor_for("tiny", "fast", box_chunk=4)
    empty = Prompts(boxes=np.zeros((0, 4)))
    out = predictor.predict(images, [empty, empty], mask_format="rle")
    assert [o.rles for o in out] == [[], []] and all(o.masks is None and len(o) == 0 for o in out)
    assert out[0].topk_labels.shape == (0, predictor._k())
    with pytest.raises(ValueError, match="mask_format"):
        predictor.predict(images[:1], [empty], mask_format="png")


def test_polygons_and_decoding_from_an_rle():
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 5:20, 10:30] = True
    masks[0, 25:35, 35:45] = True
    masks[1, 0:40:2, 3] = True  # a dotted line: no polygon with 3 points
    rles = encode_rle(masks)
    for mask, rle in zip(masks, rles):
        assert np.array_equal(decode_rle(rle), mask.numpy())
        assert mask_polygons(rle) == mask_polygons(mask)
    assert len(mask_polygons(rles[0])) == 2 and mask_polygons(rles[2]) == []
    bytes_counts = {**rles[0], "counts": rles[0]["counts"].encode("ascii")}
    assert np.array_equal(decode_rle(bytes_counts), masks[0].numpy())


def test_transposed_layout_is_encoded_without_a_copy_and_strided_input_once():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 13, 29, generator=g) > 0.5
    reference = encode_rle(masks)
    assert encode_rle_wh(masks.transpose(1, 2).contiguous()) == reference
    assert encode_rle_wh(masks.transpose(1, 2)) == reference
    with pytest.raises(TypeError):
        encode_rle_wh(masks.float())


def _awkward_masks(h: int = 37, w: int = 53) -> torch.Tensor:
    """[N, H, W]: empty, full, one pixel in each corner, a run through the bottom of one column and
    the top of the next (pycocotools' column-crossing case), rows and columns at the borders, speckle."""
    masks = torch.zeros(10, h, w, dtype=torch.bool)
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3, h - 1, w - 1] = True
    masks[4, h - 3 :, 5] = True
    masks[4, :2, 6] = True
    masks[5, :, 0] = True
    masks[6, 0, :] = True
    masks[7, 10:20, 30:31] = True
    masks[8] = torch.rand(h, w, generator=torch.Generator().manual_seed(0)) > 0.7
    masks[9, 5, w - 1] = masks[9, h - 1, 3] = True
    return masks


def test_mask_stats_equal_pycocotools_area_and_box():
    masks = _awkward_masks()
    rles = encode_rle(masks)
    areas, boxes = mask_stats_wh(masks.transpose(1, 2).contiguous())
    assert areas == rle_area(rles) == [int(m.sum()) for m in masks]
    assert boxes == rle_bbox(rles)
    assert boxes[0] == [0.0, 0.0, 0.0, 0.0] and boxes[1] == [0.0, 0.0, 53.0, 37.0] and boxes[4] == [5.0, 0.0, 2.0, 37.0]
    assert mask_stats_wh(masks[:0].transpose(1, 2)) == ([], [])


def test_records_from_the_predictor_stats_equal_records_from_pycocotools(images, predictor_for):
    """The records `ovsam label` writes are the same whether area and bbox come from the step's
    reductions or from pycocotools on the RLEs (the path of predictions without them)."""
    from dataclasses import replace

    from ovsam_model.io.datasets import ImageRecord
    from ovsam_model.labeling.records import build_records
    from ovsam_model.io.detections import PromptRecord

    predictor = predictor_for("tiny", "fast", box_chunk=4)
    h, w = images[0].shape[:2]
    boxes = _boxes(9, h, w, 5)
    assert not predictor.mask_stats_on_device  # on a CPU, pycocotools measures them (the faster there)
    assert predictor.predict_prepared([predictor.prepare(images[0])], [Prompts(boxes=boxes[:2])],
                                      mask_format="rle")[0].mask_areas is None
    with _stats_on_device(predictor):
        out = predictor.predict_prepared([predictor.prepare(images[0])], [Prompts(boxes=boxes)], mask_format="rle")[0]
    assert out.mask_areas is not None and any(a > 0 for a in out.mask_areas)
    image = ImageRecord(id=1, path="x.jpg", file_name="x.jpg", height=h, width=w)
    prompts = [PromptRecord(index=i, image_id=1, score=0.9, category_id=1, box=tuple(float(v) for v in b))
               for i, b in enumerate(boxes)]
    ids = list(range(1, len(predictor.class_names) + 1))
    ours = build_records(image, prompts, out, category_ids=ids)
    assert ours == build_records(image, prompts, replace(out, mask_areas=None, mask_boxes=None), category_ids=ids)


@pytest.mark.gpu
def test_mask_stats_on_cuda_equal_pycocotools():
    masks = _awkward_masks()
    assert mask_stats_wh(masks.transpose(1, 2).contiguous().cuda()) == (rle_area(encode_rle(masks)),
                                                                         rle_bbox(encode_rle(masks)))
