"""The predictor runs `tiny` and both baselines end to end on real images (0, 1 and 300 boxes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovsam_model.builder import build_predictor
from ovsam_model.types import Prompts


@pytest.fixture(scope="module")
def images(data_dir):
    paths = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:2]
    return [np.array(Image.open(p).convert("RGB")) for p in paths]


def _random_boxes(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 20, h - 20], size=(n, 2))
    wh = rng.uniform(8, [w / 2, h / 2], size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_predictor("tiny", random_weights=True, box_chunk=64)


@pytest.mark.parametrize("name", ["tiny", "baseline-image-crop:tiny", "baseline-feature-crop:tiny"])
def test_predictor_end_to_end(name, images, tiny):
    torch.manual_seed(0)
    predictor = tiny if name == "tiny" else build_predictor(name, random_weights=True, box_chunk=64)
    (h0, w0), (h1, w1) = images[0].shape[:2], images[1].shape[:2]
    prompts = [Prompts(boxes=_random_boxes(300, h0, w0, 0)), Prompts(boxes=_random_boxes(1, h1, w1, 1))]
    empty = Prompts(boxes=np.zeros((0, 4)))
    out = predictor.predict([images[0], images[1], images[0]], prompts + [empty])
    assert [len(o) for o in out] == [300, 1, 0]
    assert out[0].masks.shape == (300, h0, w0) and out[0].masks.dtype == torch.bool
    assert out[1].masks.shape == (1, h1, w1)
    assert out[2].masks.shape == (0, h0, w0)
    k = len(predictor.class_names)
    for o in out[:2]:
        assert ((o.labels >= 0) & (o.labels < k)).all()
        assert ((o.scores > 0) & (o.scores <= 1)).all()
        torch.testing.assert_close(o.topk_labels[:, 0], o.labels)
        assert (o.topk_scores[:, :-1] >= o.topk_scores[:, 1:]).all()
    assert len(predictor.category_ids) == k == 80


def test_chunking_does_not_change_results(images, tiny):
    h, w = images[0].shape[:2]
    prompts = [Prompts(boxes=_random_boxes(23, h, w, 5))]
    tiny.box_chunk = 64
    whole = tiny.predict(images[:1], prompts)[0]
    tiny.box_chunk = 5
    chunked = tiny.predict(images[:1], prompts)[0]
    tiny.box_chunk = 64
    assert torch.equal(whole.masks, chunked.masks)
    torch.testing.assert_close(whole.scores, chunked.scores)
    assert torch.equal(whole.labels, chunked.labels)


def test_batching_does_not_change_results(images, tiny):
    h, w = images[1].shape[:2]
    p = Prompts(boxes=_random_boxes(4, h, w, 7))
    alone = tiny.predict(images[1:2], [p])[0]
    batched = tiny.predict(images[:2], [Prompts(boxes=_random_boxes(3, *images[0].shape[:2], 8)), p])[1]
    assert (alone.masks == batched.masks).float().mean() > 0.999
    torch.testing.assert_close(alone.scores, batched.scores, atol=1e-4, rtol=1e-4)


def test_point_prompts_with_negative_clicks(images, tiny):
    h, w = images[0].shape[:2]
    points = [[[w / 2, h / 2], [10.0, 10.0]], [[w / 3, h / 3], [w / 2, h / 2]]]
    out = tiny.predict(images[:1], [Prompts(points=points, point_labels=[[1, 0], [1, 1]])])[0]
    assert out.masks.shape == (2, h, w)
    flipped = tiny.predict(images[:1], [Prompts(points=points, point_labels=[[1, 1], [1, 1]])])[0]
    assert not torch.equal(out.masks[0], flipped.masks[0]) or not torch.allclose(out.scores[0], flipped.scores[0])
