"""Plain data types shared by the predictor, the baselines, the I/O and the evaluators.

Every coordinate here is in *original image pixels*; boxes are XYXY. Conversions to the
1024 model frame live in `ovsam_model.transforms`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence

import numpy as np
import torch

from .vocab import Vocabulary

MaskFormat = Literal["bool", "rle"]
MASK_FORMATS: tuple[str, ...] = ("bool", "rle")


@dataclass
class Prompts:
    """The prompts of one image.

    boxes: [N, 4] XYXY in original pixels, or None.
    points: [N, P, 2] XY in original pixels, or None: pixel indices, SAM's click convention
        (its prompt encoder adds the +0.5 to the pixel centre, to box corners too).
    point_labels: [N, P], 1 = positive click, 0 = negative click (required with points).
    With both boxes and points, prompt i uses box i and points i together.
    """

    boxes: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None
    point_labels: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float32)
            if boxes.size and boxes.shape[-1] != 4 or boxes.ndim > 2:
                raise ValueError(f"boxes must be [N, 4] XYXY, got shape {tuple(boxes.shape)}")
            boxes = boxes.reshape(-1, 4)
            if not np.isfinite(boxes).all():
                raise ValueError("boxes contain NaN or inf")
            bad = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
            if bad.size:
                raise ValueError(f"box {int(bad[0])} is not XYXY (x2 < x1 or y2 < y1): {boxes[bad[0]].tolist()}")
            self.boxes = torch.as_tensor(boxes)
        if self.points is not None:
            pts = torch.as_tensor(np.asarray(self.points, dtype=np.float32))
            if pts.dim() == 2:  # one point per prompt
                pts = pts[:, None, :]
            self.points = pts.reshape(pts.shape[0], -1, 2)
            if self.point_labels is None:
                raise ValueError("points need point_labels (1 positive, 0 negative)")
            self.point_labels = torch.as_tensor(np.asarray(self.point_labels, dtype=np.int64)).reshape(
                self.points.shape[0], self.points.shape[1]
            )
            if not torch.isfinite(self.points).all():
                raise ValueError("points contain NaN or inf")
            if not torch.isin(self.point_labels, torch.tensor([-1, 0, 1])).all():
                raise ValueError("point labels must be 1 (positive), 0 (negative) or -1 (padding)")
        if self.boxes is not None and self.points is not None and len(self.boxes) != len(self.points):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.points)} point sets")

    def __len__(self) -> int:
        if self.boxes is not None:
            return int(self.boxes.shape[0])
        if self.points is not None:
            return int(self.points.shape[0])
        return 0

    def slice(self, start: int, stop: int) -> "Prompts":
        return Prompts(
            boxes=None if self.boxes is None else self.boxes[start:stop],
            points=None if self.points is None else self.points[start:stop],
            point_labels=None if self.point_labels is None else self.point_labels[start:stop],
        )


@dataclass
class Prediction:
    """Per-prompt results for one image (CPU tensors), in one of two mask formats.

    masks: [N, H, W] bool at the original image size ("bool" format), else None.
    labels: [N] int64, index into the vocabulary (never background).
    scores: [N] float, probability of `labels`.
    topk_labels / topk_scores: [N, k] alternatives, best first (column 0 == labels).
    rles: N COCO compressed RLEs {"size": [H, W], "counts": str} ("rle" format), else None;
        exactly `io.masks.encode_rle(masks)` of the bool format.
    mask_areas / mask_boxes: with `rles`, each mask's pixel count and XYWH box where the masks were
        made (`io.masks.mask_stats_wh`: what pycocotools' `area` / `toBbox` give); None: not known.
    """

    masks: Optional[torch.Tensor]
    labels: torch.Tensor
    scores: torch.Tensor
    topk_labels: torch.Tensor
    topk_scores: torch.Tensor
    rles: Optional[list[dict]] = None
    mask_areas: Optional[list[int]] = None
    mask_boxes: Optional[list[list[float]]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def empty(height: int, width: int, k: int = 1, mask_format: MaskFormat = "bool") -> "Prediction":
        """No prompts: [0, H, W] masks ("bool") or an empty RLE list ("rle")."""
        rle = mask_format == "rle"
        return Prediction(
            masks=None if rle else torch.zeros(0, height, width, dtype=torch.bool),
            labels=torch.zeros(0, dtype=torch.long),
            scores=torch.zeros(0),
            topk_labels=torch.zeros(0, k, dtype=torch.long),
            topk_scores=torch.zeros(0, k),
            rles=[] if rle else None,
            mask_areas=[] if rle else None,
            mask_boxes=[] if rle else None,
        )


@dataclass
class PreparedImage:
    """An image prepared for the model (made in DataLoader workers), in one of two forms:

    pixels: [3, S, S] float32 (S = the model's input size, 1024), normalised, zero-padded
    (`transforms.prepare_image`); or [3, h, w] uint8, resized only (`transforms.resize_image`, what
    predictors' `prepare` makes), which `transforms.model_input` normalises and pads on the device.
    original_size: (H, W) of the source image; input_size: (h, w) after the resize, before padding.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class Predictor(Protocol):
    """What `ovsam label` and the prompt protocol need from a model (OVSAM or a baseline).

    vocabulary: the classes; class_names[i] / category_ids[i] describe vocabulary index i (the
    values of `Prediction.labels`). weights_sha256: component → sha256 of the weight file it
    was loaded from ({} for random weights), for provenance and resume fingerprints.
    """

    vocabulary: Vocabulary
    class_names: Sequence[str]
    category_ids: Sequence[int]
    weights_sha256: dict[str, str]

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """HxWx3 uint8 RGB → model input. Pure CPU work, safe in DataLoader workers."""
        ...

    def predict_prepared(self, images: Sequence[PreparedImage], prompts: Sequence[Prompts], *,
                         mask_format: MaskFormat = "bool") -> list[Prediction]:
        """One Prompts per image, in original pixels; returns one Prediction per image, its masks
        as [N, H, W] bool ("bool") or as COCO RLEs encoded a few masks at a time ("rle")."""
        ...

    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts], *,
                mask_format: MaskFormat = "bool") -> list[Prediction]:
        """`prepare` + `predict_prepared`."""
        ...
