"""Prompts from records: a detector's boxes or clicks, from a file, stdin or a list of dicts."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from ovsam_model.io.detections import PromptSet, RawRecord, read_box_records, read_point_records, select_prompts

from .base import PromptSource, SourceContext

Records = Union[str, Path, Iterable[dict]]


class _RecordSource(PromptSource):
    """Records read by `reader`, then `select_prompts`: per-record checks, --score-thr, --max-dets."""

    reader: Callable[..., list[RawRecord]]

    def __init__(self, records: Records, *, score_thr: float = 0.0, max_dets: int = 300) -> None:
        self.records = records
        self.score_thr = score_thr
        self.max_dets = max_dets
        self._raw: Optional[list[RawRecord]] = None
        self._read_as: tuple[bool, bool] = (False, False)

    def read(self, *, strict: bool = False, require_category: bool = False) -> set[int]:
        if self._raw is not None and self._read_as == (strict, require_category):
            return {r.image_id for r in self._raw if r.problem is None}
        self._read_as = (strict, require_category)
        read = type(self).reader
        if isinstance(self.records, (str, Path)):
            self._raw = read(self.records, require_category=require_category, strict=strict)
        else:
            text = json.dumps(list(self.records))
            self._raw = read("-", stdin=io.StringIO(text), require_category=require_category, strict=strict)
        return {r.image_id for r in self._raw if r.problem is None}

    def load(self, ctx: SourceContext) -> PromptSet:
        self.read(strict=ctx.strict, require_category=ctx.require_category)
        return select_prompts(
            self._raw,  # type: ignore[arg-type]
            image_size=ctx.image_size,
            missing_reason=ctx.missing_reason,
            category_ids=ctx.category_ids,
            check_categories=ctx.check_categories,
            score_thr=self.score_thr,
            max_dets=self.max_dets,
        )

    def describe(self) -> str:
        where = self.records if isinstance(self.records, (str, Path)) else "records given in Python"
        return f"--{self.option} {where}"


class BoxSource(_RecordSource):
    """Detector boxes: a COCO results array, JSON Lines, detectron2 `instances_predictions.pth`,
    '-' (stdin) or a list of dicts {image_id, bbox XYWH, score[, category_id]}."""

    option = "boxes"
    reader = staticmethod(read_box_records)


class PointSource(_RecordSource):
    """Clicks: records {image_id, points [[x, y], ...], labels [1|0, ...][, bbox, score, category_id]}."""

    option = "points"
    reader = staticmethod(read_point_records)
