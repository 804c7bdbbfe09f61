"""Segment and name everything: a grid of single positive clicks → stable masks with open-vocabulary labels.

The steps are those of segment-anything's `SamAutomaticMaskGenerator`, built from its own helpers
(`segment_anything.utils.amg`: point grids, crop boxes, stability score, `MaskData`, crop-edge
filter, uncropping, small-region removal) and torchvision's `batched_nms`. What differs:

- one mask per click: OVSAM's decoder has one mask token and no IoU head, so a mask's quality
  is its stability score and its label;
- masks are classified after the stability and crop-edge filters, only those that remain; a mask
  is dropped when its background probability beats its best class or its best class is below
  `min_label_prob`; its score is stability × label probability (NMS ranks by it);
- full-size logits exist a few masks at a time (`transforms.iter_mask_logits`) and kept masks
  are encoded to COCO RLE at once, so a large image never holds a batch of full-size maps;
- small-region clean-up decodes one mask at a time (the generator's decodes them all at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops import batched_nms, box_area

from ..chunked import ModelPrompts
from ..classify import top_k
from ..io.masks import decode_rle, encode_rle
from ..transforms import iter_mask_logits
from ..types import PreparedImage, Prompts
from .settings import EverythingSettings

MASK_THRESHOLD = 0.0  # logits > 0 is the mask, as SAM's `mask_threshold`


@dataclass
class EverythingInput:
    """One image prepared in a DataLoader worker: the crops of every layer, each resized and
    padded for the model. crop_boxes: XYXY in image pixels; layers: each crop's layer."""

    original_size: tuple[int, int]
    crop_boxes: list[list[int]]
    layers: list[int]
    crops: list[PreparedImage]


def prepare_everything(image: np.ndarray, *, prepare: Callable[[np.ndarray], PreparedImage], crop_n_layers: int,
                       crop_overlap_ratio: float) -> EverythingInput:
    """HxWx3 uint8 → its crops prepared for the model (layer 0: the whole image)."""
    size = (int(image.shape[0]), int(image.shape[1]))
    boxes, layers = generate_crop_boxes(size, crop_n_layers, crop_overlap_ratio)
    crops = [prepare(np.ascontiguousarray(image[y0:y1, x0:x1])) for x0, y0, x1, y1 in boxes]
    return EverythingInput(original_size=size, crop_boxes=[list(map(int, b)) for b in boxes], layers=list(layers),
                           crops=crops)


def everything_preparer(predictor: Any, settings: EverythingSettings) -> Callable[[np.ndarray], EverythingInput]:
    """A picklable `prepare_everything` for DataLoader workers."""
    return partial(prepare_everything, prepare=predictor.prepare, crop_n_layers=settings.crop_n_layers,
                   crop_overlap_ratio=settings.crop_overlap_ratio)


@dataclass
class EverythingMasks:
    """The masks of one image, best score first.

    rles: COCO compressed RLEs at the image size; boxes: [n, 4] XYXY of the masks; points:
    [n, 2] the click (image pixels) each mask came from; stability: [n]; scores: [n] stability ×
    label probability; topk_labels / topk_scores: [n, k] vocabulary indices and probabilities.
    """

    rles: list[dict]
    boxes: torch.Tensor
    points: torch.Tensor
    stability: torch.Tensor
    scores: torch.Tensor
    topk_labels: torch.Tensor
    topk_scores: torch.Tensor
    crop_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))

    def __len__(self) -> int:
        return len(self.rles)


class EverythingGenerator:
    """Segment-everything with a `ChunkedPredictor` (OVSAM or a baseline)."""

    def __init__(self, predictor: Any, settings: EverythingSettings) -> None:
        self.predictor = predictor
        self.settings = settings.check()
        self.grids = settings.point_grids()
        self.k = max(1, min(int(getattr(predictor, "topk", 1)), len(predictor.class_names)))
        self.prepare: Callable[[np.ndarray], EverythingInput] = everything_preparer(predictor, settings)

    def generate(self, image: np.ndarray) -> EverythingMasks:
        """One HxWx3 uint8 RGB image → its masks."""
        return self.generate_prepared([self.prepare(image)])[0]

    @torch.inference_mode()
    def generate_prepared(self, inputs: Sequence[EverythingInput]) -> list[EverythingMasks]:
        """Prepared images → their masks. Crops are encoded `len(inputs)` at a time (the memory
        the caller's batch size allows)."""
        per_image: list[list[MaskData]] = [[] for _ in inputs]
        jobs = [(i, box, layer, crop) for i, inp in enumerate(inputs)
                for box, layer, crop in zip(inp.crop_boxes, inp.layers, inp.crops)]
        group = max(1, len(inputs))
        for start in range(0, len(jobs), group):
            chunk = jobs[start : start + group]
            feats = self.predictor.encode([crop for _, _, _, crop in chunk])
            for index, (i, box, layer, crop) in enumerate(chunk):
                per_image[i].append(self._process_crop(feats, index, crop, box, layer, inputs[i].original_size))
        return [self._merge_crops(parts, inp) for parts, inp in zip(per_image, inputs)]

    # --- one crop ------------------------------------------------------------------------

    def _process_crop(self, feats: Any, index: int, crop: PreparedImage, crop_box: list[int], layer: int,
                      image_size: tuple[int, int]) -> MaskData:
        height, width = crop.original_size
        points = self.grids[layer] * np.array([[width, height]])  # crop pixels
        data = self._empty()
        for (batch,) in batch_iterator(self.settings.points_per_batch, points):
            data.cat(self._process_batch(feats, index, crop, np.asarray(batch), crop_box, image_size))
        if len(data["rles"]):  # duplicates within the crop
            keep = batched_nms(data["boxes"].float(), data["scores"], torch.zeros(len(data["rles"])),
                               iou_threshold=self.settings.box_nms_thresh)
            data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.float32).reshape(-1, 4)
        return data

    def _process_batch(self, feats: Any, index: int, crop: PreparedImage, points: np.ndarray, crop_box: list[int],
                       image_size: tuple[int, int]) -> MaskData:
        s = self.settings
        image_h, image_w = image_size
        prompts = Prompts(points=points[:, None, :], point_labels=np.ones((len(points), 1), dtype=np.int64))
        stage = self.predictor.decode_masks(feats, index, ModelPrompts.of(prompts, crop, self.predictor.device),
                                            crop.input_size)
        kept_rows, stabilities, boxes, rles = [], [], [], []
        done = 0
        for logits in iter_mask_logits(stage.low_res, crop.input_size, crop.original_size,
                                       self.predictor.image_size, self.predictor.mask_postprocess):
            stability = calculate_stability_score(logits, MASK_THRESHOLD, s.stability_score_offset)
            masks = logits > MASK_THRESHOLD
            box = batched_mask_to_box(masks)
            keep = (stability >= s.stability_score_thresh) & masks.flatten(1).any(dim=1)
            keep &= ~is_box_near_crop_edge(box, crop_box, [0, 0, image_w, image_h])
            rows = torch.nonzero(keep).flatten()
            if len(rows):
                kept_rows.append(rows + done)
                stabilities.append(stability[rows].float().cpu())
                boxes.append(box[rows].cpu())
                rles.extend(encode_rle(uncrop_masks(masks[rows], crop_box, image_h, image_w).cpu()))
            done += logits.shape[0]
        if not rles:
            return self._empty()
        rows = torch.cat(kept_rows)
        named = self.predictor.classify(stage, rows.to(stage.low_res.device))
        labels, probs = top_k(named.probs.float(), self.k)
        labels, probs = labels.cpu(), probs.cpu()
        keep = probs[:, 0] >= s.min_label_prob
        if s.drop_background and named.background is not None:  # background wins: no object of the vocabulary
            keep &= named.background.float().cpu() <= probs[:, 0]
        stability = torch.cat(stabilities)
        data = MaskData(rles=rles, boxes=torch.cat(boxes).float(), stability=stability,
                        scores=stability * probs[:, 0], topk_labels=labels, topk_scores=probs,
                        points=torch.as_tensor(points[rows.numpy()], dtype=torch.float32))
        data.filter(keep)
        return data

    def _empty(self) -> MaskData:
        return MaskData(rles=[], boxes=torch.zeros(0, 4), stability=torch.zeros(0), scores=torch.zeros(0),
                        topk_labels=torch.zeros(0, self.k, dtype=torch.long), topk_scores=torch.zeros(0, self.k),
                        points=torch.zeros(0, 2))

    # --- one image -----------------------------------------------------------------------

    def _merge_crops(self, parts: list[MaskData], inp: EverythingInput) -> EverythingMasks:
        data = self._empty()
        data["crop_boxes"] = torch.zeros(0, 4)
        for part in parts:
            data.cat(part)
        if len(inp.crop_boxes) > 1 and len(data["rles"]):  # duplicates across crops: the smaller crop wins
            keep = batched_nms(data["boxes"].float(), 1 / box_area(data["crop_boxes"]),
                               torch.zeros(len(data["rles"])), iou_threshold=self.settings.crop_nms_thresh)
            data.filter(keep)
        if self.settings.min_mask_region_area > 0 and len(data["rles"]):
            data = remove_small_mask_regions(data, self.settings.min_mask_region_area,
                                             max(self.settings.box_nms_thresh, self.settings.crop_nms_thresh))
        order = torch.argsort(data["scores"], descending=True, stable=True)
        if self.settings.max_masks:
            order = order[: self.settings.max_masks]
        data.filter(order)
        return EverythingMasks(rles=data["rles"], boxes=data["boxes"], points=data["points"],
                               stability=data["stability"], scores=data["scores"], topk_labels=data["topk_labels"],
                               topk_scores=data["topk_scores"], crop_boxes=data["crop_boxes"])


def remove_small_mask_regions(data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
    """segment-anything's `postprocess_small_regions`, one decoded mask at a time: fill holes and
    drop islands smaller than `min_area` (`amg.remove_small_regions`, needs OpenCV), recompute the
    changed boxes, and rerun box NMS preferring masks that did not change."""
    unchanged, boxes = [], []
    for i, rle in enumerate(data["rles"]):
        mask, holes = remove_small_regions(decode_rle(rle), min_area, mode="holes")
        mask, islands = remove_small_regions(mask, min_area, mode="islands")
        unchanged.append(not (holes or islands))
        boxes.append(batched_mask_to_box(torch.as_tensor(mask)[None])[0])
        if holes or islands:
            data["rles"][i] = encode_rle(torch.as_tensor(mask)[None])[0]
    boxes_t = torch.stack(boxes).float()
    keep = batched_nms(boxes_t, torch.tensor(unchanged, dtype=torch.float32), torch.zeros(len(boxes)),
                       iou_threshold=nms_thresh)
    data["boxes"] = boxes_t
    data.filter(keep)
    return data


def iter_everything_records(masks: EverythingMasks, image_id: int, category_ids: Sequence[int]) -> Iterator[dict]:
    """COCO results records of one image's masks: category_id (the best label), score,
    bbox (XYWH of the mask), segmentation (RLE), area, stability_score, point_coords, topk."""
    from ..io.masks import rle_area, rle_bbox

    areas, bboxes = rle_area(masks.rles), rle_bbox(masks.rles)
    for i, rle in enumerate(masks.rles):
        labels, probs = masks.topk_labels[i].tolist(), masks.topk_scores[i].tolist()
        yield {
            "image_id": int(image_id),
            "category_id": int(category_ids[labels[0]]),
            "score": round(float(masks.scores[i]), 6),
            "bbox": [round(v, 3) for v in bboxes[i]],
            "segmentation": rle,
            "area": areas[i],
            "stability_score": round(float(masks.stability[i]), 6),
            "point_coords": [[round(float(v), 3) for v in masks.points[i].tolist()]],
            "topk": [{"category_id": int(category_ids[l]), "prob": round(float(p), 6)} for l, p in zip(labels, probs)],
        }


__all__ = ["EverythingGenerator", "EverythingInput", "EverythingMasks", "everything_preparer",
           "iter_everything_records", "prepare_everything", "remove_small_mask_regions"]
