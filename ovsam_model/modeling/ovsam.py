"""Composition root: frozen CLIP trunk + SAM2CLIP adapter + SAM prompt encoder + OVSAM head + FPN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ..config import OVSAMConfig
from .clip2sam import CLIP2SAMFPN, multilevel_roi_align
from .clip_trunk import ClipTrunk
from .decoder import OVSAMHead
from .sam2clip import SAM2CLIPAdapter


@dataclass
class ImageFeatures:
    """Per-batch image features (all [B, ...])."""

    clip_feats: list[torch.Tensor]  # C2..C5
    embeddings: torch.Tensor  # [B, prompt_dim, S/16, S/16], SAM's image-embedding format
    fpn_feats: list[torch.Tensor]  # 4 × [B, fpn_dim, ...]


@dataclass
class DecodeOutput:
    """Per-prompt outputs for one image, in the model frame."""

    mask_logits: torch.Tensor  # [N, 1, S/4, S/4]
    region_embeds: torch.Tensor  # [N, D] OVSAM head (not normalised)
    clip_embeds: torch.Tensor  # [N, D] frozen-CLIP region branch (not normalised)
    use_clip: torch.Tensor  # [N] bool: False where the mask is empty (head alone)
    roi_boxes: torch.Tensor  # [N, 4] XYXY, the boxes the RoIs were pooled on


def mask_boxes(mask_logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of (logits > 0) on the low-res grid, times `scale`, and a non-empty flag.

    mask_logits: [N, 1, h, w] → boxes [N, 4] XYXY (min index, max index, as
    `torchvision.ops.masks_to_boxes`), nonempty [N] bool. Empty masks get a zero box.
    """
    fg = mask_logits[:, 0] > 0  # [N, h, w]
    xs_on, ys_on = fg.any(dim=1), fg.any(dim=2)  # [N, w] occupied columns, [N, h] occupied rows
    nonempty = xs_on.any(dim=1)
    h, w = fg.shape[1], fg.shape[2]
    xr = torch.arange(w, device=fg.device)
    yr = torch.arange(h, device=fg.device)
    x1 = torch.where(xs_on, xr, w).min(dim=1).values
    x2 = torch.where(xs_on, xr, -1).max(dim=1).values
    y1 = torch.where(ys_on, yr, h).min(dim=1).values
    y2 = torch.where(ys_on, yr, -1).max(dim=1).values
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float() * scale
    return torch.where(nonempty[:, None], boxes, torch.zeros_like(boxes)), nonempty


class OVSAM(nn.Module):
    def __init__(
        self,
        cfg: OVSAMConfig,
        trunk: ClipTrunk,
        adapter: SAM2CLIPAdapter,
        prompt_encoder: PromptEncoder,
        head: OVSAMHead,
        fpn: CLIP2SAMFPN,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = trunk
        self.adapter = adapter
        self.prompt_encoder = prompt_encoder
        self.head = head
        self.fpn = fpn

    @classmethod
    def from_config(cls, cfg: OVSAMConfig, clip_pretrained: Optional[str] = None,
                    clip_cache_dir: Optional[str] = None, quick_gelu: bool = False) -> "OVSAM":
        """All modules with random weights (CLIP: `clip_pretrained` if given)."""
        grid = cfg.embedding_size
        return cls(
            cfg,
            trunk=ClipTrunk(cfg.clip, pretrained=clip_pretrained, cache_dir=clip_cache_dir, quick_gelu=quick_gelu),
            adapter=SAM2CLIPAdapter(cfg.clip.channels, cfg.adapter_dim, cfg.adapter_depth, cfg.adapter_heads,
                                    cfg.adapter_window, cfg.adapter_global_blocks, grid, cfg.prompt_dim),
            prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
                                         input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16),
            head=OVSAMHead(cfg.prompt_dim, cfg.decoder_depth, cfg.decoder_mlp_dim, cfg.decoder_heads,
                           cfg.fpn_dim, cfg.clip.embed_dim, cfg.label_token_enabled),
            fpn=CLIP2SAMFPN(cfg.clip.channels, cfg.fpn_dim),
        )

    def freeze_for_finetune(self) -> None:
        """CLIP2SAM training: CLIP, adapter and prompt encoder frozen; FPN and head trainable."""
        self.trunk.lock()
        for module in (self.adapter, self.prompt_encoder):
            for p in module.parameters():
                p.requires_grad_(False)

    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels [B, 3, S, S] (normalised, padded) → features shared by every prompt."""
        clip_feats = self.trunk(pixels)
        return ImageFeatures(clip_feats=clip_feats, embeddings=self.adapter(clip_feats), fpn_feats=self.fpn(clip_feats))

    def decode(
        self,
        feats: ImageFeatures,
        image_index: int,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
    ) -> DecodeOutput:
        """N prompts of one image, in the model frame (resized, before the +0.5 shift).

        boxes: [N, 4] XYXY; points: [N, P, 2]; point_labels: [N, P] (1 positive, 0 negative).
        """
        pts = None if points is None else (points, point_labels)
        sparse, dense = self.prompt_encoder(points=pts, boxes=boxes, masks=None)
        embedding = feats.embeddings[image_index : image_index + 1]
        image_pe = self.prompt_encoder.get_dense_pe().to(embedding.dtype)
        mask_logits, label_embed = self.head.decode(embedding, image_pe, sparse.to(embedding.dtype),
                                                    dense.to(embedding.dtype))
        scale = self.cfg.image_size / mask_logits.shape[-1]
        roi_boxes, nonempty = mask_boxes(mask_logits, scale)
        fallback = self._fallback_boxes(boxes, points, point_labels)
        if boxes is not None and self.cfg.roi_box == "prompt":
            roi_boxes = boxes.to(roi_boxes.dtype)
        else:
            roi_boxes = torch.where(nonempty[:, None], roi_boxes, fallback.to(roi_boxes.dtype))
        rois = torch.cat([roi_boxes.new_full((roi_boxes.shape[0], 1), image_index), roi_boxes], dim=1)
        fpn = [f[image_index : image_index + 1] for f in feats.fpn_feats]
        rois_local = rois.clone()
        rois_local[:, 0] = 0
        roi_feats = multilevel_roi_align(fpn, rois_local, self.cfg.roi_size, finest_scale=self.cfg.finest_scale)
        region = self.head.region_embed(roi_feats, label_embed)
        c5 = feats.clip_feats[3][image_index : image_index + 1]
        clip_region = self.trunk.region_embed(c5, rois_local, self.cfg.clip_roi_size)
        return DecodeOutput(mask_logits=mask_logits, region_embeds=region.float(), clip_embeds=clip_region.float(),
                            use_clip=nonempty, roi_boxes=roi_boxes)

    def _fallback_boxes(self, boxes: Optional[torch.Tensor], points: Optional[torch.Tensor],
                        point_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """RoI box when the mask is empty: the prompt box, else a 32-px box on the first positive click."""
        if boxes is not None:
            return boxes
        assert points is not None and point_labels is not None
        first_pos = (point_labels > 0).float().argmax(dim=1)
        centre = points[torch.arange(points.shape[0], device=points.device), first_pos]
        return torch.cat([centre - 16, centre + 16], dim=1).clamp(0, self.cfg.image_size)
