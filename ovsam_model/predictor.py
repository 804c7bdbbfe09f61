"""The OVSAM model behind the `Predictor` protocol: batched images × per-image prompts."""

from __future__ import annotations

from typing import Optional

import torch

from dataclasses import dataclass

from .chunked import ChunkedPredictor, ChunkOutput, MaskStage, ModelPrompts
from .classify import add_background, class_logits, ensemble_background, ensemble_probs
from .config import PIXEL_MEAN, PIXEL_STD
from .modeling.ovsam import OVSAM, ImageFeatures
from .runtime import autocast_context
from .vocab import Vocabulary

__all__ = ["OVSAMPredictor", "autocast_context"]


class OVSAMPredictor(ChunkedPredictor):
    """OVSAM: one image encoding per batch, then the prompts of each image through the decoder in
    chunks of `box_chunk` (the loop, masks and output formats: `chunked.ChunkedPredictor`).

    class_embeds: [K, P, D] text embeddings; seen: [K] bool, the classes the head was trained on
    (they weight the head/CLIP ensemble). `amp`: bf16 autocast on CUDA; `cpu_bf16`: the same on
    CPU (a speed-up on CPUs with native bf16: `runtime.cpu_has_native_bf16`).
    """

    def __init__(
        self,
        model: OVSAM,
        vocabulary: Vocabulary,
        class_embeds: torch.Tensor,
        seen: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        box_chunk: int = 64,
        amp: bool = True,
        cpu_bf16: bool = False,
        topk: int = 5,
        mask_postprocess: str = "fast",
        weights_sha256: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(vocabulary, device=device, image_size=model.cfg.image_size, box_chunk=box_chunk, topk=topk,
                         mask_postprocess=mask_postprocess, weights_sha256=weights_sha256,
                         pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the input is always the same padded square
        self.model = model.to(self.device).eval()
        self.class_embeds = add_background(class_embeds.float()).to(self.device)
        self.seen = seen.to(self.device)
        self.amp, self.cpu_bf16 = amp, cpu_bf16

    @property
    def cfg(self):
        return self.model.cfg

    def _encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        with autocast_context(self.device, self.amp, self.cpu_bf16):
            return self.model.encode_images(pixels)

    def _decode_chunk(self, feats: ImageFeatures, index: int, prompts: ModelPrompts,
                      input_size: tuple[int, int]) -> ChunkOutput:
        return self.classify(self.decode_masks(feats, index, prompts, input_size))

    def decode_masks(self, feats: ImageFeatures, index: int, prompts: ModelPrompts,
                     input_size: tuple[int, int]) -> MaskStage:
        with autocast_context(self.device, self.amp, self.cpu_bf16):
            logits, label_embed = self.model.decode_masks(feats, index, boxes=prompts.boxes, points=prompts.points,
                                                          point_labels=prompts.point_labels)
        return MaskStage(low_res=logits, state=_Decoded(feats, index, prompts, input_size, label_embed))

    def classify(self, stage: MaskStage, rows: Optional[torch.Tensor] = None) -> ChunkOutput:
        s: _Decoded = stage.state
        logits, label_embed, prompts = stage.low_res, s.label_embed, s.prompts
        if rows is not None:
            logits, label_embed, prompts = logits[rows], label_embed[rows], prompts.select(rows)
        with autocast_context(self.device, self.amp, self.cpu_bf16):
            out = self.model.classify_regions(s.feats, s.index, logits, label_embed, boxes=prompts.boxes,
                                              points=prompts.points, point_labels=prompts.point_labels,
                                              input_size=s.input_size)
        head = class_logits(out.region_embeds, self.class_embeds, self.cfg.logit_scale)
        clip = class_logits(out.clip_embeds, self.class_embeds, self.cfg.logit_scale)
        probs = ensemble_probs(head, clip, self.seen, self.cfg.alpha, self.cfg.beta, out.use_clip)
        background = ensemble_background(head, clip, self.cfg.alpha, out.use_clip)
        return ChunkOutput(low_res=logits, probs=probs, background=background)


@dataclass
class _Decoded:
    """What `OVSAMPredictor.classify` needs of a `decode_masks` call."""

    feats: ImageFeatures
    index: int
    prompts: ModelPrompts
    input_size: tuple[int, int]
    label_embed: torch.Tensor
