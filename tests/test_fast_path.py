"""The exact fast paths, end to end: a predictor with every `fast_path` on labels real images as
the plain reference path does (issue 8's criterion: masks IoU ≥ 0.99 and the same top-1 label on
≥ 99 % of prompts in fp32; IoU ≥ 0.98 under bf16), and `set_fast_path` reaches every module."""

from __future__ import annotations

import pytest
import torch
from conftest import agreement

from ovsam_model.builder import build_predictor
from ovsam_model.modeling.fast_path import set_fast_path
from ovsam_model.types import Prompts


@pytest.fixture(scope="module")
def real_prompts(mini_gt_boxes):
    """Three real COCO images with their GT boxes, then the same images with a centre click per box."""
    images, prompts = [], []
    for image, boxes in zip(*mini_gt_boxes):
        xyxy = torch.as_tensor(boxes.boxes)
        centres = ((xyxy[:, :2] + xyxy[:, 2:]) / 2).floor()
        images += [image, image]
        prompts += [boxes, Prompts(points=centres[:, None, :], point_labels=torch.ones(len(xyxy), 1))]
    return images, prompts


def _fast_path_modules(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if hasattr(m, "fast_path")}


def _compare(fast, plain, min_iou: float) -> None:
    ious, same = agreement(fast, plain)
    assert ious.min().item() >= min_iou, ious
    assert same.float().mean().item() >= 0.99, same


def test_set_fast_path_reaches_every_fast_module_and_both_paths_agree(real_prompts):
    images, prompts = real_prompts
    predictor = build_predictor("tiny-256", random_weights=True, device="cpu", amp=False)
    model = predictor.model
    names = _fast_path_modules(model)
    assert {"ClipTrunk", "OneTokenMaskDecoder", "SDPAAttention"} <= names, names
    count = sum(hasattr(m, "fast_path") for m in model.modules())
    assert set_fast_path(model, False) == count
    assert not any(m.fast_path for m in model.modules() if hasattr(m, "fast_path"))
    plain = predictor.predict(images, prompts)
    assert set_fast_path(model, True) == count
    fast = predictor.predict(images, prompts)
    assert sum(len(p.labels) for p in fast) == sum(len(p.boxes if p.boxes is not None else p.points) for p in prompts)
    assert any(p.masks.any() for p in fast)  # not a comparison of empty masks
    _compare(fast, plain, 0.99)
    for f, p in zip(fast, plain):  # the probabilities too, not only their argmax
        torch.testing.assert_close(f.topk_scores, p.topk_scores, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_cuda_fast_bf16_agrees_with_plain_fp32(real_prompts):
    images, prompts = real_prompts
    predictor = build_predictor("tiny-256", random_weights=True, device="cuda", amp=False)
    set_fast_path(predictor.model, False)
    plain = predictor.predict(images, prompts)
    set_fast_path(predictor.model, True)
    _compare(predictor.predict(images, prompts), plain, 0.99)  # fp32 on CUDA
    predictor.amp = True
    fast_bf16 = predictor.predict(images, prompts)
    assert agreement(fast_bf16, plain)[0].mean().item() >= 0.98
