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

    mask_logits: [N, 1, h, w] → boxes [N, 4] XYXY covering the occupied cells (cells i..j span
    [i, j + 1), as mmdet's `mask2bbox`), nonempty [N] bool. Empty masks get a zero box.
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
    boxes = torch.stack([x1, y1, x2 + 1, y2 + 1], dim=1).float() * scale
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
        input_size: Optional[tuple[int, int]] = None,
    ) -> DecodeOutput:
        """N prompts of one image, in the model frame (resized, before SAM's +0.5 shift).

        boxes: [N, 4] XYXY; points: [N, P, 2]; point_labels: [N, P] (1 positive, 0 negative,
        -1 padding). input_size: (h, w) of the resized image inside the padded square, to keep
        fallback RoIs off the padding.
        """
        mask_logits, label_embed = self.decode_masks(feats, image_index, boxes, points, point_labels)
        return self.classify_regions(feats, image_index, mask_logits, label_embed, boxes, points, point_labels,
                                     input_size)

    def decode_masks(
        self,
        feats: ImageFeatures,
        image_index: int,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of `decode`: → mask logits [N, 1, S/4, S/4] and the label branch's
        embedding [N, D]. Segment-everything filters masks here before classifying the rest."""
        embedding = feats.embeddings[image_index : image_index + 1]
        sparse, dense, image_pe = self.encode_prompts(boxes, points, point_labels)
        dtype = embedding.dtype
        return self.head.decode(embedding, image_pe.to(dtype), sparse.to(dtype), dense.to(dtype))

    def classify_regions(
        self,
        feats: ImageFeatures,
        image_index: int,
        mask_logits: torch.Tensor,
        label_embed: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        input_size: Optional[tuple[int, int]] = None,
    ) -> DecodeOutput:
        """The second half of `decode`: RoIs from the masks (or the prompts), pooled from the FPN
        (head) and from CLIP's C5 (frozen branch). Every row is independent of the others."""
        dtype = feats.embeddings.dtype
        scale = self.cfg.image_size / mask_logits.shape[-1]
        roi_boxes, nonempty = mask_boxes(mask_logits, scale)
        limit = input_size or (self.cfg.image_size, self.cfg.image_size)
        if boxes is not None and self.cfg.roi_box == "prompt":
            roi_boxes = boxes.float()
        else:
            roi_boxes = torch.where(nonempty[:, None], roi_boxes, fallback_boxes(boxes, points, point_labels, limit))
        rois = torch.cat([roi_boxes.new_zeros(roi_boxes.shape[0], 1), roi_boxes], dim=1)  # index 0: one image
        fpn = [f[image_index : image_index + 1] for f in feats.fpn_feats]
        roi_feats = multilevel_roi_align(fpn, rois, self.cfg.roi_size, finest_scale=self.cfg.finest_scale)
        region = self.head.region_embed(roi_feats.to(dtype), label_embed)
        c5 = feats.clip_feats[3][image_index : image_index + 1]
        clip_region = self.trunk.region_embed(c5, rois, self.cfg.clip_roi_size)
        return DecodeOutput(mask_logits=mask_logits, region_embeds=region.float(), clip_embeds=clip_region.float(),
                            use_clip=nonempty, roi_boxes=roi_boxes)

    def encode_prompts(self, boxes: Optional[torch.Tensor], points: Optional[torch.Tensor],
                       point_labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder in float32 even under autocast: its random-Fourier features of
        pixel coordinates lose up to ~0.1 in bf16. Returns (sparse, dense, dense positional map)."""
        device_type = self.prompt_encoder.no_mask_embed.weight.device.type
        with torch.autocast(device_type, enabled=False):
            pts = None if points is None else (points.float(), point_labels)
            sparse, dense = self.prompt_encoder(points=pts, boxes=None if boxes is None else boxes.float(), masks=None)
            return sparse, dense, self.prompt_encoder.get_dense_pe()


def fallback_boxes(boxes: Optional[torch.Tensor], points: Optional[torch.Tensor],
                   point_labels: Optional[torch.Tensor], limit: tuple[int, int]) -> torch.Tensor:
    """RoI boxes for empty masks: the prompt box, else a 32-px box on the first positive click,
    clamped to `limit` = (h, w) of the image in the model frame. [N, 4] float32."""
    if boxes is not None:
        return boxes.float()
    if points is None or point_labels is None:
        raise ValueError("a prompt needs a box or points")
    first_pos = (point_labels > 0).float().argmax(dim=1)
    centre = points[torch.arange(points.shape[0], device=points.device), first_pos].float()
    box = torch.cat([centre - 16, centre + 16], dim=1)
    upper = box.new_tensor([limit[1], limit[0], limit[1], limit[0]])
    return torch.minimum(box.clamp(min=0), upper)
