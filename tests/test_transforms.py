"""Geometry equals segment-anything's ResizeLongestSide + Sam.preprocess / postprocess_masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ovsam_model.modeling.baselines import build_tiny_sam
from ovsam_model.config import PIXEL_MEAN, PIXEL_STD
from ovsam_model.transforms import (boxes_to_model, boxes_to_original, coords_to_model, masks_to_original_exact,
                                    masks_to_original_fast, model_input, prepare_image, resize_image, resized_shape)


@pytest.fixture(scope="module")
def images(data_dir):
    paths = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:4]
    paths += sorted((data_dir / "coco-detections-sample" / "images").glob("*.jpg"))
    return [np.array(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture(scope="module")
def sam() -> Sam:
    return build_tiny_sam()


def test_prepare_image_equals_sam(images, sam):
    rls = ResizeLongestSide(1024)
    for image in images:
        ours = prepare_image(image)
        resized = torch.as_tensor(rls.apply_image(image)).permute(2, 0, 1).contiguous()[None].float()
        ref = sam.preprocess(resized)[0]
        assert ours.original_size == image.shape[:2]
        assert ours.input_size == tuple(resized.shape[-2:])
        torch.testing.assert_close(ours.pixels, ref, atol=1e-4, rtol=1e-5)


def test_prompt_transforms_equal_sam(images):
    rls = ResizeLongestSide(1024)
    rng = np.random.default_rng(0)
    for image in images:
        h, w = image.shape[:2]
        prepared = prepare_image(image)
        boxes = np.sort(rng.uniform(0, [w, h, w, h], size=(5, 4)).reshape(5, 2, 2), axis=1).reshape(5, 4)
        points = rng.uniform(0, [w, h], size=(5, 3, 2))
        ref_boxes = rls.apply_boxes(boxes, (h, w))
        ref_points = rls.apply_coords(points, (h, w))
        ours_boxes = boxes_to_model(torch.tensor(boxes, dtype=torch.float64), prepared.original_size, prepared.input_size)
        ours_points = coords_to_model(torch.tensor(points), prepared.original_size, prepared.input_size)
        np.testing.assert_allclose(ours_boxes.numpy(), ref_boxes, rtol=1e-12)
        np.testing.assert_allclose(ours_points.numpy(), ref_points, rtol=1e-12)
        back = boxes_to_original(ours_boxes, prepared.original_size, prepared.input_size)
        np.testing.assert_allclose(back.numpy(), boxes, rtol=1e-9)


def test_resized_shape_equals_sam():
    for h, w in [(480, 640), (427, 640), (640, 359), (1, 1000), (1024, 1024), (333, 500)]:
        assert resized_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


def _smooth_logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 1, 256, 256, generator=g), 15, 1, 7) * 20


def test_exact_postprocess_equals_sam(images, sam):
    for i, image in enumerate(images[:3]):
        prepared = prepare_image(image)
        low = _smooth_logits(2, i)
        ref = sam.postprocess_masks(low, prepared.input_size, prepared.original_size)
        ours = masks_to_original_exact(low, prepared.input_size, prepared.original_size)
        assert ours.shape[-2:] == image.shape[:2]
        torch.testing.assert_close(ours, ref)


def test_fast_postprocess_agrees_with_exact(images, sam):
    for i, image in enumerate(images):
        prepared = prepare_image(image)
        low = _smooth_logits(3, 10 + i)
        exact = sam.postprocess_masks(low, prepared.input_size, prepared.original_size) > 0
        fast = masks_to_original_fast(low, prepared.input_size, prepared.original_size) > 0
        assert fast.shape == exact.shape and fast.shape[-2:] == image.shape[:2]
        iou = (fast & exact).sum() / (fast | exact).sum()
        assert iou > 0.99, iou


def test_fast_postprocess_keeps_geometry():
    """A mask covering exactly the valid region's left half maps to the original's left half."""
    original, size = (300, 500), 1024
    h, w = resized_shape(*original, size)
    low = torch.full((1, 1, 256, 256), -10.0)
    low[..., : (h + 3) // 4, : w // 8] = 10.0  # left half of the valid area in the 256 grid
    mask = masks_to_original_fast(low, (h, w), original, size)[0, 0] > 0
    cols = mask.any(dim=0).nonzero().flatten()
    assert abs(int(cols.max()) + 1 - original[1] // 2) <= 2
    assert mask[:, : original[1] // 2 - 2].all()


@pytest.mark.parametrize("prepare", [prepare_image, resize_image])
def test_prepare_image_rejects_non_uint8(prepare):
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((10, 12, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        prepare(np.zeros((10, 12), dtype=np.uint8))


def _odd_images(images) -> list[np.ndarray]:
    """The real images, and shapes that pad almost all rows, almost all columns, or nothing (square, 1×1)."""
    rng = np.random.default_rng(0)
    odd = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((40, 1024, 3), (1024, 7, 3), (64, 64, 3),
                                                                           (1, 1, 3))]
    return list(images) + odd


@pytest.mark.parametrize("size,mean,std", [(1024, PIXEL_MEAN, PIXEL_STD), (256, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))])
def test_compact_model_input_equals_prepare_image(images, size, mean, std):
    """What the DataLoader workers ship (uint8, resized only) becomes, on the device, bit for bit
    the float input `prepare_image` makes: alone, in a batch of mixed sizes, and beside float images."""
    odd = _odd_images(images)
    compact = [resize_image(im, size) for im in odd]
    full = [prepare_image(im, size, mean, std) for im in odd]
    for c, f in zip(compact, full):
        assert c.pixels.dtype == torch.uint8 and c.pixels.shape == (3, *c.input_size)
        assert (c.input_size, c.original_size) == (f.input_size, f.original_size)
        assert c.pixels.numel() * c.pixels.element_size() <= f.pixels.numel() * f.pixels.element_size() / 4
    reference = torch.stack([f.pixels for f in full])
    assert torch.equal(model_input(compact, size, mean, std, "cpu"), reference)
    assert torch.equal(model_input(compact[:1], size, mean, std, "cpu"), reference[:1])
    mixed = [c if i % 2 else f for i, (c, f) in enumerate(zip(compact, full))]
    assert torch.equal(model_input(mixed, size, mean, std, "cpu"), reference)
    narrow_w = compact[-3].input_size[1]  # the 1024×7 image: almost all padding, which must be 0 and was checked
    assert narrow_w < size / 100
    assert reference[-3, :, :, narrow_w:].eq(0).all() and reference[-3, :, :, :narrow_w].ne(0).any()


@pytest.mark.gpu
def test_compact_model_input_on_cuda_equals_prepare_image(images):
    odd = _odd_images(images)
    compact = [resize_image(im) for im in odd]
    reference = torch.stack([prepare_image(im).pixels for im in odd])
    got = model_input(compact, 1024, PIXEL_MEAN, PIXEL_STD, "cuda")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), reference, atol=1e-6, rtol=0)
