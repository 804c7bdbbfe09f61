"""Decode images and run `predictor.prepare` in DataLoader workers.

A missing or corrupt file (or object, for a URI: `ovsam_model.io.uris`) does not stop the run:
its item carries `error` and no `prepared` image, and the main loop counts the image's prompts as
skipped and records the image as done without records
(`ovsam_model.labeling.records.skipped_entry`), so that merging and --resume go on.

Decoding (bit depth, float images) and the frame (`exif` policy: "auto", "apply", "ignore")
follow `ovsam_model.io.images`: the image is prepared in the frame whose size is the record's
(height, width), and an image that fits no allowed frame is skipped as a size mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ovsam_model.io.datasets import ImageRecord
from ovsam_model.io.detections import InputError, SkipReason
from ovsam_model.io.images import FloatImageError, ImageSizeMismatch, check_exif_policy, read_image
from ovsam_model.types import PreparedImage


@dataclass
class LoadedImage:
    record: ImageRecord
    prepared: Optional[PreparedImage]
    error: Optional[str] = None  # what went wrong, for the warning
    reason: Optional[str] = None  # the SkipReason its prompts are counted under
    orientation: int = 1  # the file's EXIF orientation tag (1 = none or unknown)
    exif_applied: bool = False  # whether `prepared` is in the EXIF-rotated frame


def read_rgb(path, exif: str = "ignore") -> np.ndarray:
    """H×W×3 uint8 RGB. Default: pixel layout as stored (no EXIF rotation, matching COCO sizes);
    `exif="apply"` gives the `ImageOps.exif_transpose` frame. High-bit-depth images are scaled,
    float images raise `FloatImageError` (a ValueError): see `ovsam_model.io.images`."""
    return read_image(path, exif=exif).array


class ImageDataset(Dataset):
    """Item i: image i decoded and prepared for the model, or an error marker."""

    def __init__(
        self,
        images: Sequence[ImageRecord],
        prepare: Callable[[np.ndarray], PreparedImage],
        exif: str = "auto",
    ) -> None:
        self.images = list(images)
        self.prepare = prepare
        self.exif = check_exif_policy(exif)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> LoadedImage:
        return load_image(self.images[i], self.prepare, self.exif)


def load_image(record: ImageRecord, prepare: Callable[[np.ndarray], PreparedImage], exif: str = "auto") -> LoadedImage:
    """`record`'s image decoded in its frame (`exif` policy) and prepared for the model, or an
    error marker: what a DataLoader worker (`ImageDataset`) or a Ray task makes of one image."""
    try:
        decoded = read_image(record.path, exif=exif, expected_hw=(record.height, record.width))
    except InputError:  # a URI whose protocol package this worker lacks: the run's mistake, not the image's
        raise
    except FileNotFoundError:
        return LoadedImage(record, None, "file not found", SkipReason.IMAGE_UNREADABLE)
    except ImageSizeMismatch as exc:
        return LoadedImage(record, None, str(exc), SkipReason.IMAGE_SIZE_MISMATCH)
    except FloatImageError as exc:
        return LoadedImage(record, None, str(exc), SkipReason.IMAGE_FLOAT)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return LoadedImage(record, None, f"cannot decode ({exc})", SkipReason.IMAGE_UNREADABLE)
    return LoadedImage(record, prepare(decoded.array), orientation=decoded.orientation, exif_applied=decoded.exif_applied)


def ordered_loader(dataset: Dataset, *, batch_size: int = 1, workers: int = 0, pin_memory: bool = False,
                   collate_fn: Callable[[list], Any] = list) -> DataLoader:
    """Batches of `dataset`'s items, in index order, made in `workers` processes (0: in this
    one). The default `collate_fn=list` keeps the items as they are instead of stacking tensors;
    `pin_memory` (for CUDA) pins the tensors a batch carries (an item may define `pin_memory()`
    itself)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory)


def make_loader(
    images: Sequence[ImageRecord],
    prepare: Callable[[np.ndarray], PreparedImage],
    *,
    batch_size: int = 1,
    workers: int = 0,
    exif: str = "auto",
) -> DataLoader:
    """Batches are lists of `LoadedImage` in the order of `images` (no shuffling; `collate_fn=list`
    keeps the items as they are instead of stacking tensors). `exif`: the frame policy of
    `ovsam_model.io.images` (pass the same value as to `load_image_source`)."""
    return ordered_loader(ImageDataset(images, prepare, exif=exif), batch_size=batch_size, workers=workers)
