"""CLIP2SAM recognition path: FPN on the frozen CLIP C2..C5 and per-level RoIAlign (spec §2)."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, roi_align

FPN_STRIDES = (4, 8, 16, 32)


class CLIP2SAMFPN(nn.Module):
    """mmdet-style FPN computed by `torchvision.ops.FeaturePyramidNetwork`.

    Official keys `lateral_convs.{i}.conv.*` / `fpn_convs.{i}.conv.*` map to torchvision's
    `fpn.inner_blocks.{i}.0.*` / `fpn.layer_blocks.{i}.0.*` (see `official_key_map`).
    """

    _TO_LOCAL = ((re.compile(r"^lateral_convs\.(\d+)\.conv\."), r"fpn.inner_blocks.\1.0."),
                 (re.compile(r"^fpn_convs\.(\d+)\.conv\."), r"fpn.layer_blocks.\1.0."))
    _TO_OFFICIAL = ((re.compile(r"^fpn\.inner_blocks\.(\d+)\.0\."), r"lateral_convs.\1.conv."),
                    (re.compile(r"^fpn\.layer_blocks\.(\d+)\.0\."), r"fpn_convs.\1.conv."))

    def __init__(self, in_channels: Sequence[int] = (384, 768, 1536, 3072), out_channels: int = 256) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[C2..C5] → 4 maps of `out_channels` at strides 4/8/16/32."""
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())

    @classmethod
    def official_key_map(cls, key: str) -> str:
        for pattern, repl in cls._TO_LOCAL:
            if pattern.match(key):
                return pattern.sub(repl, key)
        return key

    @classmethod
    def local_key_map(cls, key: str) -> str:
        for pattern, repl in cls._TO_OFFICIAL:
            if pattern.match(key):
                return pattern.sub(repl, key)
        return key


def roi_levels(rois: torch.Tensor, finest_scale: float = 56.0, num_levels: int = 4) -> torch.Tensor:
    """mmdet's level rule: floor(log2(sqrt(w·h) / finest_scale + 1e-6)) clamped to 0..L-1.

    rois: [R, 5] (image index, XYXY). Returns [R] int64.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    feats: Sequence[torch.Tensor],
    rois: torch.Tensor,
    output_size: int,
    strides: Sequence[int] = FPN_STRIDES,
    finest_scale: float = 56.0,
) -> torch.Tensor:
    """RoIAlign each RoI on the FPN level its scale selects (aligned=True, sampling_ratio=0).

    feats: FPN maps [B, C, H_l, W_l]; rois: [R, 5] (image index, XYXY in the model frame).
    Returns [R, C, output_size, output_size] float32.

    `torchvision.ops.MultiScaleRoIAlign` uses the same level rule but aligned=False, which
    is not what the released weights were trained with.
    """
    rois = rois.float()  # box coordinates in bf16 would be off by up to 4 px at 1024
    levels = roi_levels(rois, finest_scale, len(feats))
    out = rois.new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    for level, (feat, stride) in enumerate(zip(feats, strides)):
        idx = torch.nonzero(levels == level).squeeze(1)
        if idx.numel() == 0:
            continue
        out[idx] = roi_align(feat.float(), rois[idx], output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=0, aligned=True)
    return out
