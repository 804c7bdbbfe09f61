"""Decode images and run `predictor.prepare` in DataLoader workers.

A missing or corrupt file does not stop the run: its item carries `error` and no `prepared`
image, and the main loop counts the image's prompts as skipped and records the image as done
without records (`ovsam_model.io.writers.skipped_entry`), so that merging and --resume go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ovsam_model.io.datasets import ImageRecord
from ovsam_model.io.detections import SkipReason
from ovsam_model.types import PreparedImage


@dataclass
class LoadedImage:
    record: ImageRecord
    prepared: Optional[PreparedImage]
    error: Optional[str] = None  # what went wrong, for the warning
    reason: Optional[str] = None  # the SkipReason its prompts are counted under


def read_rgb(path) -> np.ndarray:
    """H×W×3 uint8 RGB (pixel layout as stored: no EXIF rotation, matching COCO sizes)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))  # writable copy (torch.from_numpy warns on read-only)


class ImageDataset(Dataset):
    """Item i: image i decoded and prepared for the model, or an error marker."""

    def __init__(self, images: Sequence[ImageRecord], prepare: Callable[[np.ndarray], PreparedImage]) -> None:
        self.images = list(images)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> LoadedImage:
        record = self.images[i]
        try:
            array = read_rgb(record.path)
        except FileNotFoundError:
            return LoadedImage(record, None, "file not found", SkipReason.IMAGE_UNREADABLE)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return LoadedImage(record, None, f"cannot decode ({exc})", SkipReason.IMAGE_UNREADABLE)
        if array.shape[:2] != (record.height, record.width):
            error = f"decoded size {array.shape[0]}x{array.shape[1]} != {record.height}x{record.width} in --ann"
            return LoadedImage(record, None, error, SkipReason.IMAGE_SIZE_MISMATCH)
        return LoadedImage(record, self.prepare(array))


def make_loader(
    images: Sequence[ImageRecord],
    prepare: Callable[[np.ndarray], PreparedImage],
    *,
    batch_size: int = 1,
    workers: int = 0,
) -> DataLoader:
    """Batches are lists of `LoadedImage` in the order of `images` (no shuffling; `collate_fn=list`
    keeps the items as they are instead of stacking tensors)."""
    return DataLoader(ImageDataset(images, prepare), batch_size=batch_size, num_workers=workers, collate_fn=list)
