"""COCO results array: what `COCO.loadRes`, `LVISResults`, `ovsam eval` and FiftyOne read."""

from __future__ import annotations

from typing import Sequence

from ..records import Entry
from .base import JsonFileFormat


class CocoResults(JsonFileFormat):
    """A JSON array of {image_id, category_id, score, bbox, segmentation, detector_score,
    detector_category_id, topk}, sorted by image id then input order. No `area`: loadRes
    computes it."""

    name = "results"
    help = "COCO results array (loadRes, LVISResults, ovsam eval, FiftyOne)"

    def open_document(self, categories: Sequence[dict]) -> None:
        self.write("[")

    def add(self, entry: Entry) -> None:
        for record in entry["records"]:
            out = {k: v for k, v in record.items() if k != "area"}
            out["segmentation"] = self.segmentation_of(record)
            self.write(("," if self.count else "") + self.dumps(out))
            self.count += 1

    def close_document(self) -> None:
        self.write("]")
