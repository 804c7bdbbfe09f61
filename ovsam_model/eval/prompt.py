"""Prompt protocol (paper Tab. 1): one prompt per ground-truth instance, mask IoU and top-1 accuracy.

- Instances: every non-crowd annotation whose mask (pycocotools `annToMask`, original resolution)
  is non-empty; crowd annotations and empty masks are skipped and counted.
- Prompts, in original pixels (the `Prompts` frame): the GT box (COCO XYWH → XYXY), or one
  positive click on the mask pixel farthest from the mask border (`centre_point`, pixel index).
- IoU: exact, |pred ∧ gt| / |pred ∨ gt| on boolean masks at the original image size.
- Accuracy: `predictor.category_ids[label] == category_id` of the instance.
- Base / novel: COCO 48 / 17 (instances of the 15 other COCO classes count toward the overall
  mIoU / Acc only); LVIS frequent + common / rare from the GT categories' `frequency`.
- Images: sorted by id; only those with at least one instance; `max_images` keeps the first N.
- Each image is read, its GT masks decoded and its prompts made in DataLoader workers
  (`workers`; `_PromptImages`), together with the predictor's `prepare` when it has one
  (then `predict_prepared` runs on the pinned pixels); batches keep the image order, so the
  numbers do not depend on `workers`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import torch
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from ovsam_model.eval.detector import load_ground_truth
from ovsam_model.eval.report import PromptResult
from ovsam_model.io.loader import ordered_loader
from ovsam_model.splits import coco_split_ids, lvis_split_ids
from ovsam_model.types import PreparedImage, Predictor, Prompts

# The prompt protocol runs SAM's own two-step mask post-processing (upsample to the input size,
# crop the padding, resize to the image), as the published numbers were made.
PUBLISHED_MASK_POSTPROCESS = "exact"

PromptType = Literal["box", "point"]
Dataset = Literal["coco", "lvis"]


def centre_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) = (column, row) of the mask pixel farthest from the mask border.

    mask: [H, W] bool/uint8, non-empty. The distance is the exact Euclidean distance
    (DIST_L2 + DIST_MASK_PRECISE) to the nearest pixel outside the mask, with the image border
    counting as outside (the mask is padded with one pixel of zeros). Ties go to the first
    maximum in row-major order. The point is the pixel's index, SAM's click convention: SAM's
    prompt encoder adds the +0.5 that moves it to the pixel centre.
    """
    padded = np.pad(np.asarray(mask).astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    if dist.max() <= 0:
        raise ValueError("centre_point needs a non-empty mask")
    row, col = divmod(int(np.argmax(dist)), mask.shape[1])
    return float(col), float(row)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Exact IoU of two [H, W] boolean masks (0 when both are empty)."""
    inter = np.count_nonzero(np.logical_and(pred, gt))
    union = np.count_nonzero(np.logical_or(pred, gt))
    return inter / union if union else 0.0


def image_path(images_dir: str | os.PathLike, img: Mapping[str, Any]) -> Path:
    """Locate an image record's file: `file_name`, or LVIS v1's `coco_url` (`val2017/…`)."""
    root = Path(images_dir)
    candidates: list[Path] = []
    if img.get("file_name"):
        candidates += [root / img["file_name"], root / Path(img["file_name"]).name]
    if img.get("coco_url"):
        split, name = str(img["coco_url"]).rstrip("/").split("/")[-2:]
        candidates += [root / split / name, root / name]
    for c in candidates:
        if c.is_file():
            return c
    if not candidates:
        raise ValueError(f"image {img.get('id')} has neither 'file_name' nor 'coco_url'")
    raise FileNotFoundError(f"image {img.get('id')} not found: {candidates[0]}")


def load_rgb(path: Path, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB; the size must match the ground-truth record."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[:2] != (height, width):
        raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, ground truth says {width}x{height}")
    return arr


@dataclass
class _ImageTask:
    img: Mapping[str, Any]
    anns: list[Mapping[str, Any]]  # non-crowd annotations of the image


def _coco_api(gt: Mapping[str, Any]) -> COCO:
    """A pycocotools COCO index over the dict (read-only use: annToMask does not write)."""
    coco = COCO()
    coco.dataset = dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _groups(gt: Mapping[str, Any], dataset: Dataset) -> dict[int, str]:
    """category id → "base" / "novel" (ids outside both are absent)."""
    base, novel = (coco_split_ids if dataset == "coco" else lvis_split_ids)(gt["categories"])
    return {**{c: "base" for c in base}, **{c: "novel" for c in novel}}


def _tasks(coco: COCO, max_images: Optional[int]) -> tuple[list[_ImageTask], int]:
    """Images (sorted by id) with at least one non-crowd annotation; number of crowd anns skipped."""
    tasks, crowd = [], 0
    for img_id in sorted(coco.imgs):
        anns = coco.imgToAnns.get(img_id, [])
        kept = [a for a in anns if not a.get("iscrowd", 0)]
        if max_images is not None and len(tasks) >= max_images:
            break
        crowd += len(anns) - len(kept)
        if kept:
            tasks.append(_ImageTask(coco.imgs[img_id], kept))
    return tasks, crowd


def _prompts(anns: Sequence[Mapping[str, Any]], masks: Sequence[np.ndarray], prompt: PromptType) -> Prompts:
    """One prompt per annotation, original pixels: XYXY boxes or [N, 1, 2] positive points."""
    if prompt == "box":
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        return Prompts(boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
    points = np.array([centre_point(m) for m in masks], dtype=np.float64).reshape(-1, 1, 2)
    return Prompts(points=points, point_labels=np.ones((len(anns), 1), dtype=np.int64))


@dataclass
class _ImageInputs:
    """One image's predictor inputs and ground truth, made in a DataLoader worker.

    image: [H, W, 3] uint8 RGB, or the predictor's `PreparedImage`; None when no instance of
    the image has a non-empty mask. gt: [N, H, W] bool, the kept instances' masks (a tensor:
    it leaves the worker through shared memory). empty: annotations skipped for an empty mask.
    error: what reading the image raised, re-raised in the main process as it is (a DataLoader
    would wrap it in a message about the worker).
    """

    image: Optional[np.ndarray | PreparedImage]
    prompts: Optional[Prompts]
    anns: list[Mapping[str, Any]]
    gt: Optional[torch.Tensor]
    empty: int
    error: Optional[Exception] = None

    def pin_memory(self) -> "_ImageInputs":
        """The DataLoader's pin_memory hook: pins the model input (what goes to the device)."""
        if isinstance(self.image, PreparedImage):
            return replace(self, image=replace(self.image, pixels=self.image.pixels.pin_memory()))
        return self


class _PromptImages(TorchDataset):
    """Item i: `_ImageInputs` of task i (image read as `load_rgb` does, GT masks by `annToMask`)."""

    def __init__(self, coco: COCO, tasks: Sequence[_ImageTask], images_dir: str | os.PathLike, prompt: PromptType,
                 prepare: Optional[Callable[[np.ndarray], PreparedImage]] = None) -> None:
        self.coco, self.tasks, self.images_dir, self.prompt, self.prepare = coco, list(tasks), images_dir, prompt, prepare

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> _ImageInputs:
        task = self.tasks[i]
        masks = [self.coco.annToMask(a).astype(bool) for a in task.anns]
        keep = [j for j, m in enumerate(masks) if m.any()]
        empty = len(masks) - len(keep)
        if not keep:
            return _ImageInputs(None, None, [], None, empty)
        anns = [task.anns[j] for j in keep]
        masks = [masks[j] for j in keep]
        try:
            image = load_rgb(image_path(self.images_dir, task.img), int(task.img["height"]), int(task.img["width"]))
        except (OSError, ValueError) as e:
            return _ImageInputs(None, None, [], None, empty, error=e)
        return _ImageInputs(image if self.prepare is None else self.prepare(image), _prompts(anns, masks, self.prompt),
                            anns, torch.from_numpy(np.stack(masks)), empty)


def _prepares(predictor: Predictor) -> bool:
    """Whether the predictor splits `predict` into `prepare` (run in the workers) and `predict_prepared`."""
    return callable(getattr(predictor, "prepare", None)) and callable(getattr(predictor, "predict_prepared", None))


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def evaluate_prompts(
    predictor: Predictor,
    gt: str | os.PathLike | Mapping[str, Any],
    images_dir: str | os.PathLike,
    *,
    prompt: PromptType = "box",
    dataset: Dataset = "coco",
    batch_size: int = 1,
    max_images: Optional[int] = None,
    progress: bool = True,
    model_name: Optional[str] = None,
    workers: int = 0,
    pin_memory: Optional[bool] = None,
) -> PromptResult:
    """Run `predictor` with one prompt per GT instance, batch_size images per call; see the module doc.

    workers: DataLoader processes reading the images (0: this process). pin_memory: pin the
    prepared pixels (default: when the predictor's `device` is CUDA)."""
    if prompt not in ("box", "point"):
        raise ValueError(f"prompt must be 'box' or 'point', not {prompt!r}")
    if dataset not in ("coco", "lvis"):
        raise ValueError(f"dataset must be 'coco' or 'lvis', not {dataset!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if workers < 0:
        raise ValueError("workers must be at least 0")
    gt_data = load_ground_truth(gt)
    groups = _groups(gt_data, dataset)
    coco = _coco_api(gt_data)
    tasks, skipped_crowd = _tasks(coco, max_images)
    vocab_ids = [int(c) for c in predictor.category_ids]

    ious: dict[str, list[float]] = {"all": [], "base": [], "novel": []}
    hits: dict[str, list[float]] = {"all": [], "base": [], "novel": []}
    skipped_empty = 0
    bar = tqdm(total=len(tasks), desc=model_name or "prompt eval", unit="img", disable=not progress, file=sys.stderr)
    prepared = _prepares(predictor)
    if pin_memory is None:
        pin_memory = torch.device(getattr(predictor, "device", "cpu")).type == "cuda"
    data = _PromptImages(coco, tasks, images_dir, prompt, predictor.prepare if prepared else None)
    for batch in ordered_loader(data, batch_size=batch_size, workers=workers, pin_memory=pin_memory and prepared):
        for item in batch:
            if item.error is not None:
                raise item.error
        skipped_empty += sum(item.empty for item in batch)
        ready = [item for item in batch if item.image is not None]
        images = [item.image for item in ready]
        prompts = [item.prompts for item in ready]
        metas = [(item.anns, item.gt.numpy()) for item in ready]
        run = predictor.predict_prepared if prepared else predictor.predict
        preds = run(images, prompts) if images else []
        if len(preds) != len(images):
            raise ValueError(f"predictor returned {len(preds)} predictions for {len(images)} images")
        for pred, (anns, masks) in zip(preds, metas):
            if len(pred) != len(anns):
                raise ValueError(f"predictor returned {len(pred)} masks for {len(anns)} prompts")
            pred_masks = pred.masks.detach().cpu().numpy().astype(bool)
            if pred_masks.shape[1:] != masks[0].shape:
                raise ValueError(f"predicted masks are {pred_masks.shape[1:]}, images are {masks[0].shape}")
            labels = pred.labels.detach().cpu().numpy().reshape(-1)
            for ann, gt_mask, pred_mask, label in zip(anns, masks, pred_masks, labels):
                iou = mask_iou(pred_mask, gt_mask)
                hit = float(vocab_ids[int(label)] == int(ann["category_id"]))
                for key in ("all", groups.get(int(ann["category_id"]))):
                    if key is not None:
                        ious[key].append(iou)
                        hits[key].append(hit)
        bar.update(len(batch))
    bar.close()

    notes = ["mask IoU exact on boolean masks at the original resolution (JSON: fractions; table: percent)",
             "crowd annotations and annotations with empty masks are skipped"]
    if dataset == "coco":
        notes.append("base/novel = COCO OV 48/17; the 15 other classes count toward the overall numbers only")
    else:
        notes.append("base = LVIS frequent + common, novel = rare (GT 'frequency')")
    return PromptResult(
        model=model_name or getattr(predictor, "name", type(predictor).__name__),
        dataset=dataset,
        prompt=prompt,
        num_images=len(tasks),
        num_instances=len(ious["all"]),
        num_base=len(ious["base"]),
        num_novel=len(ious["novel"]),
        miou=_mean(ious["all"]),
        miou_base=_mean(ious["base"]),
        miou_novel=_mean(ious["novel"]),
        acc=_mean(hits["all"]),
        acc_base=_mean(hits["base"]),
        acc_novel=_mean(hits["novel"]),
        num_skipped_crowd=skipped_crowd,
        num_skipped_empty=skipped_empty,
        notes=notes,
    )
