"""The paper's two-backbone baselines (Fig. 2a/2b): SAM for the mask, frozen CLIP for the label.

- image-crop: the image inside the mask box, with everything outside the mask set to the mean
  colour, resized to CLIP's input size and encoded by CLIP's whole image tower;
- feature-crop: CLIP's C5 on the whole (1024-padded) image, RoIAligned on the mask box and
  pooled by CLIP's own attention-pool head.
Both sit behind the same `Predictor` interface as OVSAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torchvision.ops import roi_align

from ..chunked import ChunkedPredictor, ChunkOutput, ModelPrompts
from ..classify import class_logits
from ..vocab import Vocabulary
from .clip_trunk import ClipTrunk
from .ovsam import fallback_boxes, mask_boxes

BaselineMode = Literal["image-crop", "feature-crop"]

# CLIP's own pixel statistics (RGB, 0-255): the image-crop baseline feeds CLIP as CLIP expects.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


def build_tiny_sam(image_size: int = 1024, prompt_dim: int = 32) -> Sam:
    """SAM's real architecture at small widths (random weights), for tests and benchmarks."""
    grid = image_size // 16
    encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                              out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=14, global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=prompt_dim, num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2))
    return Sam(encoder, prompt, decoder)


@dataclass
class BaselineFeatures:
    """Per-batch features of the baselines (all [B, ...]).

    pixels: the SAM-normalised inputs (the image-crop baseline crops them); embeddings: SAM's
    image embeddings; c5: CLIP's last stage (feature-crop only, else None).
    """

    pixels: torch.Tensor
    embeddings: torch.Tensor
    c5: Optional[torch.Tensor]


class SAMClipBaseline(ChunkedPredictor):
    """SAM + frozen CLIP behind the `Predictor` protocol (the loop: `chunked.ChunkedPredictor`)."""

    def __init__(
        self,
        sam: Sam,
        clip: ClipTrunk,
        vocabulary: Vocabulary,
        class_embeds: torch.Tensor,
        mode: BaselineMode,
        *,
        device: str | torch.device = "cpu",
        box_chunk: int = 64,
        topk: int = 5,
        clip_input_size: Optional[int] = None,
        clip_roi_size: int = 12,
        logit_scale: float = 100.0,
        mask_postprocess: str = "fast",
        weights_sha256: Optional[dict[str, str]] = None,
    ) -> None:
        if mode not in ("image-crop", "feature-crop"):
            raise ValueError(f"unknown baseline mode {mode!r}")
        self._sam_mean = sam.pixel_mean.flatten().tolist()
        self._sam_std = sam.pixel_std.flatten().tolist()
        super().__init__(vocabulary, device=device, image_size=sam.image_encoder.img_size, box_chunk=box_chunk,
                         topk=topk, mask_postprocess=mask_postprocess, weights_sha256=weights_sha256,
                         pixel_mean=tuple(self._sam_mean), pixel_std=tuple(self._sam_std))
        self.sam = sam.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.mode = mode
        self.class_embeds = class_embeds.float().to(self.device)
        # CLIP's own input size (RN50x16: 384, ConvNeXt-L-320: 320) for the image-crop baseline
        visual_size = getattr(clip.clip.visual, "image_size", 384)
        visual_size = visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size
        self.clip_input_size = int(clip_input_size or visual_size)
        self.clip_roi_size = clip_roi_size
        self.logit_scale = logit_scale

    def _encode_images(self, pixels: torch.Tensor) -> BaselineFeatures:
        c5 = self.clip(pixels)[3] if self.mode == "feature-crop" else None
        return BaselineFeatures(pixels=pixels, embeddings=self.sam.image_encoder(pixels), c5=c5)

    def _decode_chunk(self, feats: BaselineFeatures, index: int, prompts: ModelPrompts,
                      input_size: tuple[int, int]) -> ChunkOutput:
        points = None if prompts.points is None else (prompts.points, prompts.point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
        low_res, _ = self.sam.mask_decoder(image_embeddings=feats.embeddings[index : index + 1],
                                           image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
        roi_boxes, nonempty = mask_boxes(low_res, self.image_size / low_res.shape[-1])
        fallback = fallback_boxes(prompts.boxes, prompts.points, prompts.point_labels, input_size)
        roi_boxes = torch.where(nonempty[:, None], roi_boxes, fallback)
        rois = torch.cat([roi_boxes.new_zeros(roi_boxes.shape[0], 1), roi_boxes], dim=1)
        if self.mode == "image-crop":
            region = self._image_crop_embed(feats.pixels[index : index + 1], low_res, rois)
        else:
            region = self.clip.region_embed(feats.c5[index : index + 1], rois, self.clip_roi_size)
        probs = class_logits(region.float(), self.class_embeds, self.logit_scale).softmax(dim=-1)
        return ChunkOutput(low_res=low_res, probs=probs)

    def _image_crop_embed(self, pixels: torch.Tensor, low_res: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Masked crops of the model-frame image, resized to CLIP's input by RoIAlign, then CLIP."""
        size = self.clip_input_size
        crops = roi_align(pixels.expand(1, -1, -1, -1), rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        n = rois.shape[0]
        mask_rois = rois.clone()
        mask_rois[:, 0] = torch.arange(n, device=rois.device, dtype=rois.dtype)
        scale = low_res.shape[-1] / self.image_size
        inside = roi_align(low_res.float(), mask_rois, size, spatial_scale=scale, sampling_ratio=2, aligned=True) > 0
        crops = crops * inside  # outside the mask: 0 in SAM-normalised space = the mean colour
        sam_mean = crops.new_tensor(self._sam_mean).view(1, 3, 1, 1)
        sam_std = crops.new_tensor(self._sam_std).view(1, 3, 1, 1)
        raw = crops * sam_std + sam_mean
        clip_in = (raw - crops.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / crops.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return self.clip.clip.encode_image(clip_in)
