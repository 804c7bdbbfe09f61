"""Module-level checks: official layouts, FPN and RoIAlign against explicit computations."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes, roi_align

from ovsam_model.config import ClipConfig
from ovsam_model.modeling.clip2sam import CLIP2SAMFPN, multilevel_roi_align, roi_levels
from ovsam_model.modeling.clip_trunk import ClipTrunk
from ovsam_model.modeling.decoder import OVSAMHead
from ovsam_model.modeling.ovsam import mask_boxes
from ovsam_model.modeling.sam2clip import SAM2CLIPAdapter


def _layout(keys_dir, name):
    return json.loads((keys_dir / name).read_text())["keys"]


def test_full_size_modules_have_the_official_layouts(keys_dir):
    adapter = {"neck_student." + k: list(v.shape) for k, v in SAM2CLIPAdapter().state_dict().items()}
    assert adapter == _layout(keys_dir, "sam2clip_vith_rn50x16.json")
    fpn = CLIP2SAMFPN()
    ours = {"mask_decoder." + k: list(v.shape) for k, v in OVSAMHead().state_dict().items()}
    ours.update({"fpn_neck." + fpn.local_key_map(k): list(v.shape) for k, v in fpn.state_dict().items()})
    assert ours == _layout(keys_dir, "clip2sam_coco_rn50x16.json")
    assert sum(t.numel() for t in SAM2CLIPAdapter().state_dict().values()) == 134_087_648


def test_fpn_key_map_round_trips():
    fpn = CLIP2SAMFPN()
    for key in fpn.state_dict():
        official = fpn.local_key_map(key)
        assert official.startswith(("lateral_convs.", "fpn_convs.")) and ".conv." in official
        assert fpn.official_key_map(official) == key


def test_fpn_equals_mmdet_style_computation():
    """Laterals 1×1, nearest top-down to the lower level's size, 3×3 outputs, with biases."""
    torch.manual_seed(0)
    chans = (8, 16, 32, 64)
    fpn = CLIP2SAMFPN(chans, 12)
    for p in fpn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    feats = [torch.randn(2, c, 64 // 2**i, 48 // 2**i) for i, c in enumerate(chans)]
    sd = {fpn.local_key_map(k): v for k, v in fpn.state_dict().items()}
    lat = [F.conv2d(f, sd[f"lateral_convs.{i}.conv.weight"], sd[f"lateral_convs.{i}.conv.bias"])
           for i, f in enumerate(feats)]
    for i in range(3, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    ref = [F.conv2d(x, sd[f"fpn_convs.{i}.conv.weight"], sd[f"fpn_convs.{i}.conv.bias"], padding=1)
           for i, x in enumerate(lat)]
    for a, b in zip(fpn(feats), ref):
        torch.testing.assert_close(a, b)


def test_roi_levels_follow_the_mmdet_rule():
    sizes = [10, 55, 56, 111, 112, 200, 224, 448, 1000]
    rois = torch.tensor([[0, 0, 0, s, s] for s in sizes], dtype=torch.float32)
    expected = [min(3, max(0, math.floor(math.log2(s / 56 + 1e-6)))) for s in sizes]
    assert roi_levels(rois).tolist() == expected
    assert expected == [0, 0, 0, 0, 1, 1, 2, 3, 3]


def test_multilevel_roi_align_uses_aligned_roialign_per_level():
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 256 // 2**i, 256 // 2**i) for i in range(4)]
    rois = torch.tensor([[0, 10, 10, 40, 50], [1, 0, 0, 300, 300], [0, 100, 50, 900, 1000], [1, 5, 5, 130, 140]],
                        dtype=torch.float32)
    out = multilevel_roi_align(feats, rois, 7)
    for r, level in zip(range(4), roi_levels(rois).tolist()):
        ref = roi_align(feats[level], rois[r : r + 1], 7, spatial_scale=1 / (4 * 2**level), sampling_ratio=0,
                        aligned=True)
        torch.testing.assert_close(out[r : r + 1], ref)
    assert roi_levels(rois).tolist() == [0, 2, 3, 1]  # every level is exercised


def test_mask_boxes_cover_whole_cells():
    """Cells i..j of the low-res grid span [i, j + 1) (mmdet's mask2bbox), times the scale."""
    g = torch.Generator().manual_seed(0)
    logits = torch.full((4, 1, 32, 24), -1.0)  # not square: rows and columns cannot be swapped
    logits[0, 0, 3:9, 5:20] = 1  # rows 3..8, columns 5..19
    logits[1, 0, 0:32, 23:24] = 1
    logits[2, 0, 10, 10] = 1  # a single cell is a 4×4 box, not a point
    logits[3, 0] = torch.randn(32, 24, generator=g)
    boxes, nonempty = mask_boxes(logits, 4.0)
    assert boxes[0].tolist() == [20.0, 12.0, 80.0, 36.0]
    assert boxes[1].tolist() == [92.0, 0.0, 96.0, 128.0]
    assert boxes[2].tolist() == [40.0, 40.0, 44.0, 44.0]
    ref = (masks_to_boxes(logits[:, 0] > 0) + torch.tensor([0.0, 0.0, 1.0, 1.0])) * 4
    torch.testing.assert_close(boxes, ref)
    assert nonempty.all()
    empty_boxes, empty = mask_boxes(torch.full((1, 1, 8, 8), -1.0), 4.0)
    assert not empty.any() and empty_boxes.abs().sum() == 0


def test_label_branch_is_multiplied_by_zero_unless_enabled():
    torch.manual_seed(0)
    head = OVSAMHead(transformer_dim=32, mlp_dim=64, num_heads=2, fpn_dim=16, embed_dim=24)
    roi = torch.randn(3, 16, 7, 7)
    label = torch.randn(3, 24)
    base = F.relu(F.conv2d(roi, head.roi_conv[0].conv.weight)).mean(dim=(2, 3))
    torch.testing.assert_close(head.region_embed(roi, label), base)
    head.label_token_enabled = True
    torch.testing.assert_close(head.region_embed(roi, label), base + label)


def test_convnext_trunk_gives_four_strided_levels():
    """The ConvNeXt path (timm trunk inside open_clip) at a tiny width."""
    custom = {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    trunk = ClipTrunk(ClipConfig(name="convnext-atto", pretrained=None, custom=custom,
                                 channels=(40, 80, 160, 320), embed_dim=32))
    feats = trunk(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in feats] == [40, 80, 160, 320]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]
    region = trunk.region_embed(feats[3], torch.tensor([[0.0, 0, 0, 64, 64]]), 4)
    assert region.shape == (1, 32)


def test_clip_region_head_on_the_whole_image_equals_clip_image_encoding():
    """At CLIP's own input size (12×12 C5 grid) a whole-image 12×12 RoI samples every C5 cell at
    its centre, so the region branch must reproduce open_clip's image embedding exactly."""
    from ovsam_model.config import TINY

    torch.manual_seed(0)
    trunk = ClipTrunk(TINY.clip)
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        c5 = trunk(x)[3]
        rois = torch.tensor([[0.0, 0, 0, 384, 384], [1.0, 0, 0, 384, 384]])
        ours = trunk.region_embed(c5, rois, 12)
        ref = trunk.clip.encode_image(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
