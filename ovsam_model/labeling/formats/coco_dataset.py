"""COCO dataset JSON: what CVAT, FiftyOne, supervision and pycocotools' `COCO()` open."""

from __future__ import annotations

from typing import Sequence

from ..records import Entry
from .base import JsonFileFormat


class CocoDataset(JsonFileFormat):
    """{"categories", "annotations", "images"}: annotations get ids 1.. and `iscrowd` 0; every
    labeled image is listed, also one whose detections were all filtered out, but not an image
    that could not be read. `images` is written last so that annotations stream to disk."""

    name = "dataset"
    help = "COCO dataset JSON (images, categories, annotations: CVAT, FiftyOne, supervision)"

    def open_document(self, categories: Sequence[dict]) -> None:
        self._images: list[dict] = []
        self.write('{"categories":' + self.dumps(list(categories)) + ',"annotations":[')

    def add(self, entry: Entry) -> None:
        if not entry.get("skipped"):
            self._images.append(entry["image"])
        for record in entry["records"]:
            self.count += 1
            annotation = {"id": self.count, **record, "segmentation": self.segmentation_of(record), "iscrowd": 0}
            self.write(("," if self.count > 1 else "") + self.dumps(annotation))

    def close_document(self) -> None:
        self.write('],"images":' + self.dumps(self._images) + "}")
