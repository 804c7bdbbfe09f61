"""Batched images × per-image prompts → masks at the original size, labels, probabilities."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .classify import add_background, class_logits, ensemble_probs, top_k
from .modeling.ovsam import OVSAM, ImageFeatures
from .transforms import binary_masks_to_original, boxes_to_model, coords_to_model, prepare_image
from .types import PreparedImage, Prediction, Prompts
from .vocab import Vocabulary


def autocast_context(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp`; a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class OVSAMPredictor:
    """The OVSAM model behind the `Predictor` protocol (see `types.Predictor`).

    Prompts go through the decoder in chunks of `box_chunk` per image, so 300 boxes on one
    image need memory for `box_chunk` prompts only; masks leave the device as bool.
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
        topk: int = 5,
        mask_postprocess: str = "fast",
        weights_sha256: Optional[dict[str, str]] = None,
    ) -> None:
        if mask_postprocess not in ("fast", "exact"):
            raise ValueError("mask_postprocess must be 'fast' or 'exact'")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the input is always the same padded square
        self.model = model.to(self.device).eval()
        self.vocabulary = vocabulary
        self.class_names = list(vocabulary.class_names)
        self.category_ids = list(vocabulary.category_ids)
        self.class_embeds = add_background(class_embeds.float()).to(self.device)
        self.seen = seen.to(self.device)
        self.box_chunk = max(1, int(box_chunk))
        self.amp = amp
        self.topk = topk
        self.mask_postprocess = mask_postprocess
        self.weights_sha256 = dict(weights_sha256 or {})
        # A plain function (picklable without the model) so DataLoader workers can run it.
        self.prepare: Callable[[np.ndarray], PreparedImage] = partial(prepare_image, size=model.cfg.image_size)

    @property
    def cfg(self):
        return self.model.cfg


    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[Prediction]:
        return self.predict_prepared([self.prepare(im) for im in images], prompts)

    @torch.inference_mode()
    def predict_prepared(self, images: Sequence[PreparedImage], prompts: Sequence[Prompts]) -> list[Prediction]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt sets")
        results: list[Optional[Prediction]] = [None] * len(images)
        busy = [i for i, p in enumerate(prompts) if len(p) > 0]
        for i, image in enumerate(images):
            if i not in busy:
                results[i] = Prediction.empty(*image.original_size, k=self._k())
        if busy:
            pixels = torch.stack([images[i].pixels for i in busy]).to(self.device, non_blocking=True)
            with autocast_context(self.device, self.amp):
                feats = self.model.encode_images(pixels)
            for j, i in enumerate(busy):
                results[i] = self._predict_image(feats, j, images[i], prompts[i])
        return results  # type: ignore[return-value]

    def _k(self) -> int:
        return max(1, min(self.topk, len(self.class_names)))

    def _predict_image(self, feats: ImageFeatures, index: int, image: PreparedImage, prompts: Prompts) -> Prediction:
        parts = [self._predict_chunk(feats, index, image, prompts.slice(s, s + self.box_chunk))
                 for s in range(0, len(prompts), self.box_chunk)]
        return Prediction(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("masks", "labels", "scores", "topk_labels", "topk_scores")))

    def _predict_chunk(self, feats: ImageFeatures, index: int, image: PreparedImage, prompts: Prompts) -> Prediction:
        osz, isz = image.original_size, image.input_size
        boxes = points = labels = None
        if prompts.boxes is not None:
            boxes = boxes_to_model(prompts.boxes, osz, isz).to(self.device)
        if prompts.points is not None:
            points = coords_to_model(prompts.points, osz, isz).to(self.device)
            labels = prompts.point_labels.to(self.device)
        with autocast_context(self.device, self.amp):
            out = self.model.decode(feats, index, boxes=boxes, points=points, point_labels=labels, input_size=isz)
        masks = binary_masks_to_original(out.mask_logits, isz, osz, self.cfg.image_size, self.mask_postprocess)
        head = class_logits(out.region_embeds, self.class_embeds, self.cfg.logit_scale)
        clip = class_logits(out.clip_embeds, self.class_embeds, self.cfg.logit_scale)
        probs = ensemble_probs(head, clip, self.seen, self.cfg.alpha, self.cfg.beta, out.use_clip)
        top_labels, top_scores = top_k(probs, self._k())
        return Prediction(masks=masks, labels=top_labels[:, 0].cpu(), scores=top_scores[:, 0].float().cpu(),
                          topk_labels=top_labels.cpu(), topk_scores=top_scores.float().cpu())
