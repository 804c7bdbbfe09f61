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
    """Images per call do not change a single bit (the engine leaves the batch size out of its
    resume fingerprint): the trunk, adapter and FPN are batch-invariant on CPU."""
    h, w = images[1].shape[:2]
    p = Prompts(boxes=_random_boxes(4, h, w, 7))
    alone = tiny.predict(images[1:2], [p], mask_format="rle")[0]
    batched = tiny.predict(images[:2], [Prompts(boxes=_random_boxes(3, *images[0].shape[:2], 8)), p],
                           mask_format="rle")[1]
    assert alone.rles == batched.rles
    assert torch.equal(alone.scores, batched.scores) and torch.equal(alone.topk_labels, batched.topk_labels)


def _assert_implements_protocol(predictor) -> None:
    """Structural, isinstance-free: every attribute of `types.Predictor` exists, and every method
    accepts the protocol's parameters (same names, kinds, defaults; extras need defaults)."""
    import inspect

    from ovsam_model.types import Predictor

    for name in Predictor.__annotations__:
        assert hasattr(predictor, name), name
    for name, member in vars(Predictor).items():
        if name.startswith("_") or not callable(member):
            continue
        wanted = list(inspect.signature(member).parameters.values())[1:]  # without self
        got = inspect.signature(getattr(predictor, name)).parameters
        for param in wanted:
            assert param.name in got, f"{name}() lacks {param.name}"
            ours = got[param.name]
            kinds = {param.kind, ours.kind} <= {param.POSITIONAL_OR_KEYWORD, param.POSITIONAL_ONLY}
            assert kinds or ours.kind == param.kind, f"{name}({param.name}) kind"
            assert ours.default == param.default, f"{name}({param.name}) default"
        extra = [p for n, p in got.items() if n not in {q.name for q in wanted}]
        assert all(p.default is not p.empty for p in extra), f"{name}() has extra required parameters"
    assert list(predictor.class_names) == list(predictor.vocabulary.class_names)
    assert list(predictor.category_ids) == list(predictor.vocabulary.category_ids)
    assert isinstance(predictor.weights_sha256, dict)


@pytest.mark.parametrize("name", ["tiny", "baseline-image-crop:tiny", "baseline-feature-crop:tiny"])
def test_predictors_implement_the_protocol(name, tiny):
    predictor = tiny if name == "tiny" else build_predictor(name, random_weights=True)
    _assert_implements_protocol(predictor)


def test_weights_sha256_is_a_constructor_argument(tiny):
    from ovsam_model.modeling.baselines import SAMClipBaseline, build_tiny_sam
    from ovsam_model.modeling.clip_trunk import ClipTrunk
    from ovsam_model.predictor import OVSAMPredictor

    hashes = {"sam": "a" * 64}
    baseline = SAMClipBaseline(build_tiny_sam(), ClipTrunk(tiny.cfg.clip), tiny.vocabulary,
                               tiny.class_embeds[:-1].cpu(), "feature-crop", weights_sha256=hashes)
    assert baseline.weights_sha256 == hashes and baseline.weights_sha256 is not hashes
    ovsam = OVSAMPredictor(tiny.model, tiny.vocabulary, tiny.class_embeds[:-1].cpu(), tiny.seen)
    assert ovsam.weights_sha256 == {}
    _assert_implements_protocol(baseline)


def test_point_prompts_with_negative_clicks(images, tiny):
    h, w = images[0].shape[:2]
    points = [[[w / 2, h / 2], [10.0, 10.0]], [[w / 3, h / 3], [w / 2, h / 2]]]
    out = tiny.predict(images[:1], [Prompts(points=points, point_labels=[[1, 0], [1, 1]])])[0]
    assert out.masks.shape == (2, h, w)
    flipped = tiny.predict(images[:1], [Prompts(points=points, point_labels=[[1, 1], [1, 1]])])[0]
    assert not torch.equal(out.masks[0], flipped.masks[0]) or not torch.allclose(out.scores[0], flipped.scores[0])


def test_seen_classes_come_from_the_training_vocabulary(tiny):
    from ovsam_model.splits import COCO_BASE

    seen = {tiny.class_names[i] for i in tiny.seen.nonzero().flatten().tolist()}
    assert seen == set(COCO_BASE)


def _decode_tiny(tiny, image, **prompts):
    from ovsam_model.transforms import prepare_image

    prepared = prepare_image(image)
    with torch.no_grad():
        feats = tiny.model.encode_images(prepared.pixels[None])
        return tiny.model.decode(feats, 0, input_size=prepared.input_size, **prompts), prepared


def test_empty_mask_falls_back_to_the_prompt_and_the_head_alone(images, tiny, monkeypatch):
    """An empty mask: RoI on the prompt box (boxes) or a 32-px box on the click (points),
    clamped to the image; the frozen-CLIP branch is switched off for that prompt."""
    from ovsam_model.modeling import ovsam as ovsam_mod

    real = tiny.model.head.decode

    def empty_masks(*args, **kwargs):
        masks, label = real(*args, **kwargs)
        return torch.full_like(masks, -5.0), label

    monkeypatch.setattr(tiny.model.head, "decode", empty_masks)
    box = torch.tensor([[100.0, 120.0, 300.0, 260.0]])
    out, _ = _decode_tiny(tiny, images[0], boxes=box)
    assert not out.use_clip.any() and torch.equal(out.roi_boxes, box)
    click = torch.tensor([[[5.0, 500.0]]])
    out, prepared = _decode_tiny(tiny, images[0], points=click, point_labels=torch.tensor([[1]]))
    h, w = prepared.input_size
    assert out.roi_boxes[0].tolist() == [0.0, min(484.0, h), 21.0, min(516.0, h)]
    assert ovsam_mod.fallback_boxes(None, click, torch.tensor([[1]]), (h, w))[0].tolist() == out.roi_boxes[0].tolist()
    probs_all_head = tiny.predict(images[:1], [Prompts(boxes=box.numpy())])[0].scores
    assert torch.isfinite(probs_all_head).all()


def test_roi_box_follows_the_mask_or_the_prompt(images, tiny):
    from ovsam_model.modeling.ovsam import mask_boxes

    box = torch.tensor([[100.0, 120.0, 300.0, 260.0]])
    out, _ = _decode_tiny(tiny, images[0], boxes=box)
    expected, nonempty = mask_boxes(out.mask_logits, 4.0)
    assert nonempty.all() and torch.equal(out.roi_boxes, expected)
    cfg = tiny.model.cfg
    tiny.model.cfg = cfg.with_(roi_box="prompt")
    try:
        out, _ = _decode_tiny(tiny, images[0], boxes=box)
    finally:
        tiny.model.cfg = cfg
    assert torch.equal(out.roi_boxes, box)


def test_bf16_autocast_keeps_prompt_encoding_and_rois_in_float32(images, tiny):
    """Under autocast the prompt encoder and RoIAlign boxes stay float32 (CPU autocast stands in
    for CUDA here): the masks of a bf16 run agree with float32."""
    box = torch.tensor([[101.3, 119.7, 301.1, 262.9]])
    from ovsam_model.transforms import prepare_image

    prepared = prepare_image(images[0])
    sparse, dense, pe = tiny.model.encode_prompts(box, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse16, dense16, pe16 = tiny.model.encode_prompts(box, None, None)
    assert sparse16.dtype == torch.float32 and pe16.dtype == torch.float32
    torch.testing.assert_close(sparse16, sparse)
    torch.testing.assert_close(pe16, pe)
    with torch.no_grad():
        feats = tiny.model.encode_images(prepared.pixels[None])
    from ovsam_model.modeling.clip2sam import multilevel_roi_align

    rois = torch.cat([torch.zeros(1, 1), box], dim=1)
    ref = multilevel_roi_align([f.float() for f in feats.fpn_feats], rois, 7)
    low = multilevel_roi_align([f.to(torch.bfloat16) for f in feats.fpn_feats], rois, 7)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0.05)


def test_whole_predictor_under_bf16_autocast_agrees_with_float32(images, tiny):
    """CPU bf16 autocast (`cpu_bf16`, as CUDA's `amp`): the whole predictor runs without a dtype
    error and its masks agree with float32 (mean IoU ≥ 0.98, as the CUDA test demands)."""
    h, w = images[0].shape[:2]
    prompts = [Prompts(boxes=_random_boxes(12, h, w, 3)),
               Prompts(points=[[[w / 2, h / 2]], [[w / 4, h / 3]]], point_labels=[[1], [1]])]
    ref = tiny.predict([images[0], images[0]], prompts)
    tiny.cpu_bf16 = True
    try:
        low = tiny.predict([images[0], images[0]], prompts)
    finally:
        tiny.cpu_bf16 = False
    for a, b in zip(ref, low):
        inter = (a.masks & b.masks).flatten(1).sum(1).float()
        union = (a.masks | b.masks).flatten(1).sum(1).float().clamp(min=1)
        assert (inter / union).mean() >= 0.98
        assert torch.isfinite(b.scores).all()
