"""The paper's two-backbone baselines (Fig. 2a/2b): SAM for the mask, frozen CLIP for the label.

- image-crop: the image inside the mask box, with everything outside the mask set to the mean
  colour, resized to CLIP's input size and encoded by CLIP's whole image tower;
- feature-crop: CLIP's C5 on the whole (1024-padded) image, RoIAligned on the mask box and
  pooled by CLIP's own attention-pool head.
Both sit behind the same `Predictor` interface as OVSAM.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torchvision.ops import roi_align

from ..classify import class_logits, top_k
from ..transforms import binary_masks_to_original, boxes_to_model, coords_to_model, prepare_image
from ..types import PreparedImage, Prediction, Prompts
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


class SAMClipBaseline:
    """SAM + frozen CLIP behind the `Predictor` protocol."""

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
    ) -> None:
        if mode not in ("image-crop", "feature-crop"):
            raise ValueError(f"unknown baseline mode {mode!r}")
        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.mode = mode
        self.vocabulary = vocabulary
        self.class_names = list(vocabulary.class_names)
        self.category_ids = list(vocabulary.category_ids)
        self.class_embeds = class_embeds.float().to(self.device)
        self.box_chunk = max(1, int(box_chunk))
        self.topk = topk
        # CLIP's own input size (RN50x16: 384, ConvNeXt-L-320: 320) for the image-crop baseline
        visual_size = getattr(clip.clip.visual, "image_size", 384)
        visual_size = visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size
        self.clip_input_size = int(clip_input_size or visual_size)
        self.clip_roi_size = clip_roi_size
        self.logit_scale = logit_scale
        self.weights_sha256: dict[str, str] = {}
        self._sam_mean = sam.pixel_mean.flatten().tolist()
        self._sam_std = sam.pixel_std.flatten().tolist()
        # A plain function (picklable without the models) so DataLoader workers can run it.
        self.prepare: Callable[[np.ndarray], PreparedImage] = partial(
            prepare_image, size=self.image_size, mean=tuple(self._sam_mean), std=tuple(self._sam_std))

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size


    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[Prediction]:
        return self.predict_prepared([self.prepare(im) for im in images], prompts)

    @torch.inference_mode()
    def predict_prepared(self, images: Sequence[PreparedImage], prompts: Sequence[Prompts]) -> list[Prediction]:
        k = max(1, min(self.topk, len(self.class_names)))
        out: list[Prediction] = []
        for image, p in zip(images, prompts):
            if len(p) == 0:
                out.append(Prediction.empty(*image.original_size, k=k))
                continue
            pixels = image.pixels[None].to(self.device)
            embedding = self.sam.image_encoder(pixels)
            c5 = self.clip(pixels)[3] if self.mode == "feature-crop" else None
            parts = [self._chunk(pixels, embedding, c5, image, p.slice(s, s + self.box_chunk), k)
                     for s in range(0, len(p), self.box_chunk)]
            out.append(Prediction(*(torch.cat([getattr(x, f) for x in parts]) for f in
                                    ("masks", "labels", "scores", "topk_labels", "topk_scores"))))
        return out

    def _chunk(self, pixels: torch.Tensor, embedding: torch.Tensor, c5: Optional[torch.Tensor],
               image: PreparedImage, prompts: Prompts, k: int) -> Prediction:
        osz, isz = image.original_size, image.input_size
        boxes = None if prompts.boxes is None else boxes_to_model(prompts.boxes, osz, isz).to(self.device)
        points = None
        if prompts.points is not None:
            points = (coords_to_model(prompts.points, osz, isz).to(self.device), prompts.point_labels.to(self.device))
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
        roi_boxes, nonempty = mask_boxes(low_res, self.image_size / low_res.shape[-1])
        fallback = fallback_boxes(boxes, *(points or (None, None)), isz)
        roi_boxes = torch.where(nonempty[:, None], roi_boxes, fallback)
        rois = torch.cat([roi_boxes.new_zeros(roi_boxes.shape[0], 1), roi_boxes], dim=1)
        if self.mode == "image-crop":
            region = self._image_crop_embed(pixels, low_res, rois)
        else:
            region = self.clip.region_embed(c5, rois, self.clip_roi_size)
        probs = class_logits(region.float(), self.class_embeds, self.logit_scale).softmax(dim=-1)
        labels, scores = top_k(probs, k)
        masks = binary_masks_to_original(low_res, isz, osz, self.image_size)
        return Prediction(masks=masks, labels=labels[:, 0].cpu(), scores=scores[:, 0].cpu(),
                          topk_labels=labels.cpu(), topk_scores=scores.cpu())

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
