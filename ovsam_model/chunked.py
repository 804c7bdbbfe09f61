"""One prompt-chunking loop for every predictor: images → features → chunks of prompts → results.

`ChunkedPredictor.predict_prepared` encodes the images that have prompts in one batch, then runs
each image's prompts through the decoder `box_chunk` at a time. A subclass supplies only

- `_encode_images`: [B, 3, S, S] padded model inputs → its per-batch features, and
- `_decode_chunk`: ≤ box_chunk prompts of one image, in the model frame → low-res mask logits
  [n, 1, s, s] over the padded S×S square and foreground class probabilities [n, K].

The loop owns the rest: images without prompts, the prompt frame change, top-k, and the masks at
the original size. The per-chunk state is the low-res logits; full-size masks exist a few at a
time (`transforms.MASK_PIXEL_BUDGET`), either copied into the [N, H, W] bool result ("bool") or
encoded to COCO RLE at once ("rle"), so an image with thousands of prompts never holds them all.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .classify import top_k
from .io.masks import encode_rle_wh, mask_stats_wh
from .transforms import (POSTPROCESS_MODES, boxes_to_model, coords_to_model, iter_binary_masks_wh, model_input,
                         resize_image)
from .types import MASK_FORMATS, MaskFormat, PreparedImage, Prediction, Prompts
from .vocab import Vocabulary


@dataclass
class ModelPrompts:
    """Prompts of one image in the model frame (resized, before SAM's +0.5 shift), on the device.

    boxes: [n, 4] XYXY or None; points: [n, P, 2] XY or None; point_labels: [n, P] or None.
    """

    boxes: Optional[torch.Tensor]
    points: Optional[torch.Tensor]
    point_labels: Optional[torch.Tensor]

    @staticmethod
    def of(prompts: Prompts, image: PreparedImage, device: torch.device) -> "ModelPrompts":
        """Original-pixel prompts of `image` → the model frame on `device`."""
        osz, isz = image.original_size, image.input_size
        boxes = points = labels = None
        if prompts.boxes is not None:
            boxes = boxes_to_model(prompts.boxes, osz, isz).to(device)
        if prompts.points is not None:
            points = coords_to_model(prompts.points, osz, isz).to(device)
            labels = prompts.point_labels.to(device)
        return ModelPrompts(boxes, points, labels)

    def select(self, rows: torch.Tensor) -> "ModelPrompts":
        """The prompts at `rows` (indices or a bool mask)."""
        pick = (lambda t: None if t is None else t[rows])
        return ModelPrompts(pick(self.boxes), pick(self.points), pick(self.point_labels))


@dataclass
class ChunkOutput:
    """What a subclass decodes for ≤ box_chunk prompts of one image.

    low_res: [n, 1, s, s] mask logits over the padded S×S model square (any float dtype).
    probs: [n, K] foreground class probabilities (background excluded).
    background: [n] probability of the background class, or None for a model without one.
    """

    low_res: torch.Tensor
    probs: torch.Tensor
    background: Optional[torch.Tensor] = None


@dataclass
class MaskStage:
    """Masks decoded for prompts of one image, not yet classified: segment-everything filters
    them (stability, crop edges) and classifies only the rest (`ChunkedPredictor.classify`).

    low_res: as `ChunkOutput.low_res`; state: whatever the predictor needs to classify rows.
    """

    low_res: torch.Tensor
    state: Any


class ChunkedPredictor(abc.ABC):
    """The shared body of OVSAM and the baselines (the `types.Predictor` protocol).

    image_size: S, the side of the padded square model input. box_chunk: prompts per decoder
    call. topk: alternatives kept per prompt. mask_postprocess: "fast" or "exact"
    (`transforms.iter_binary_masks_wh`). pixel_mean / pixel_std: the model's normalisation.
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        *,
        device: str | torch.device,
        image_size: int,
        box_chunk: int,
        topk: int,
        mask_postprocess: str,
        weights_sha256: Optional[dict[str, str]],
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        if mask_postprocess not in POSTPROCESS_MODES:
            raise ValueError(f"mask_postprocess must be one of {POSTPROCESS_MODES}, got {mask_postprocess!r}")
        self.device = torch.device(device)
        self.vocabulary = vocabulary
        self.class_names = list(vocabulary.class_names)
        self.category_ids = list(vocabulary.category_ids)
        self.image_size = int(image_size)
        self.box_chunk = max(1, int(box_chunk))
        self.topk = topk
        self.mask_postprocess = mask_postprocess
        self.weights_sha256: dict[str, str] = dict(weights_sha256 or {})
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        # "rle" masks' areas and boxes measured on the device (`io.masks.mask_stats_wh`); on a CPU,
        # pycocotools on each RLE is the faster for a trained model's masks (`labeling.records`)
        self.mask_stats_on_device = self.device.type != "cpu"
        # A plain function (picklable without the model) so DataLoader workers can run it; the
        # compact form: `encode` normalises and pads on the device (`transforms.model_input`).
        self.prepare: Callable[[np.ndarray], PreparedImage] = partial(resize_image, size=self.image_size)

    @abc.abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> Any:
        """[B, 3, S, S] normalised, padded inputs on the device → features for `_decode_chunk`."""

    @abc.abstractmethod
    def _decode_chunk(self, feats: Any, index: int, prompts: ModelPrompts, input_size: tuple[int, int]) -> ChunkOutput:
        """Prompts of image `index` of the batch `feats` was encoded from; input_size: (h, w) of
        the resized image inside the padded square."""

    def decode_masks(self, feats: Any, index: int, prompts: ModelPrompts, input_size: tuple[int, int]) -> MaskStage:
        """The masks of ≤ box_chunk prompts of image `index` of `feats`, classified later by
        `classify`. This default decodes and classifies at once; a predictor whose classifier
        needs only some rows overrides both to classify the rows that are kept."""
        out = self._decode_chunk(feats, index, prompts, input_size)
        return MaskStage(low_res=out.low_res, state=out)

    def classify(self, stage: MaskStage, rows: Optional[torch.Tensor] = None) -> ChunkOutput:
        """Class probabilities of the masks of `stage` at `rows` (indices or a bool mask; None:
        all). `low_res` of the result holds those rows' logits."""
        out: ChunkOutput = stage.state
        if rows is None:
            return out
        return ChunkOutput(low_res=out.low_res[rows], probs=out.probs[rows],
                           background=None if out.background is None else out.background[rows])

    def encode(self, images: Sequence[PreparedImage]) -> Any:
        """Features of a batch of prepared images, for `decode_masks` (index i: images[i])."""
        return self._encode_images(model_input(images, self.image_size, self.pixel_mean, self.pixel_std, self.device))

    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts], *,
                mask_format: MaskFormat = "bool") -> list[Prediction]:
        """`prepare` + `predict_prepared`."""
        return self.predict_prepared([self.prepare(im) for im in images], prompts, mask_format=mask_format)

    @torch.inference_mode()
    def predict_prepared(self, images: Sequence[PreparedImage], prompts: Sequence[Prompts], *,
                         mask_format: MaskFormat = "bool") -> list[Prediction]:
        """One Prompts per image (original pixels) → one Prediction per image.

        mask_format "bool": `Prediction.masks` [N, H, W] bool; "rle": `Prediction.rles`, the COCO
        RLEs `io.masks.encode_rle` gives for those masks, encoded a few masks at a time.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt sets")
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        results = [Prediction.empty(*image.original_size, k=self._k(), mask_format=mask_format) for image in images]
        busy = [i for i, p in enumerate(prompts) if len(p) > 0]
        if busy:
            feats = self.encode([images[i] for i in busy])
            for j, i in enumerate(busy):
                results[i] = self._predict_image(feats, j, images[i], prompts[i], mask_format)
        return results

    def _k(self) -> int:
        return max(1, min(self.topk, len(self.class_names)))

    def _predict_image(self, feats: Any, index: int, image: PreparedImage, prompts: Prompts,
                       mask_format: MaskFormat) -> Prediction:
        """Every chunk of one image's prompts; masks filled in (bool) or encoded (rle) per step."""
        n = len(prompts)
        masks = torch.empty(n, *image.original_size, dtype=torch.bool) if mask_format == "bool" else None
        rles: list[dict] = []
        areas: list[int] = []
        boxes: list[list[float]] = []
        labels, scores = [], []
        done = 0
        for start in range(0, n, self.box_chunk):
            chunk = ModelPrompts.of(prompts.slice(start, start + self.box_chunk), image, self.device)
            out = self._decode_chunk(feats, index, chunk, image.input_size)
            top_labels, top_scores = top_k(out.probs, self._k())
            labels.append(top_labels.cpu())
            scores.append(top_scores.float().cpu())
            for step in iter_binary_masks_wh(out.low_res, image.input_size, image.original_size, self.image_size,
                                             self.mask_postprocess):
                if masks is not None:
                    masks[done : done + step.shape[0]] = step.cpu().transpose(1, 2)
                else:
                    if self.mask_stats_on_device:
                        step_areas, step_boxes = mask_stats_wh(step)  # before the masks leave the device
                        areas += step_areas
                        boxes += step_boxes
                    rles.extend(encode_rle_wh(step))
                done += step.shape[0]
        topk_labels, topk_scores = torch.cat(labels), torch.cat(scores)
        stats = masks is None and self.mask_stats_on_device
        return Prediction(masks=masks, labels=topk_labels[:, 0].clone(), scores=topk_scores[:, 0].clone(),
                          topk_labels=topk_labels, topk_scores=topk_scores, rles=rles if masks is None else None,
                          mask_areas=areas if stats else None, mask_boxes=boxes if stats else None)
