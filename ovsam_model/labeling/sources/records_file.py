"""Prompts from records: a detector's boxes or clicks, from a file, stdin or a list of dicts."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from ovsam_model.io.detections import (InputError, PromptSet, RawRecord, read_box_records, read_point_records,
                                       select_prompts)

from .base import PromptSource, SourceContext

Records = Union[str, Path, Iterable[dict]]


class _RecordSource(PromptSource):
    """Records read by `reader`, then `select_prompts`: per-record checks, --score-thr, --max-dets."""

    reader: Callable[..., list[RawRecord]]

    def __init__(self, records: Records, *, score_thr: float = 0.0, max_dets: int = 300) -> None:
        if math.isnan(score_thr):  # every comparison with NaN is False: it would filter nothing
            raise InputError("--score-thr (score_thr=) must be a number, not nan")
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
            text = json.dumps(self._record_list(), default=_plain)
            self._raw = read("-", stdin=io.StringIO(text), require_category=require_category, strict=strict)
        return {r.image_id for r in self._raw if r.problem is None}

    def _record_list(self) -> list:
        """The records given in Python, as a list; a single dict or a non-iterable is a one-line
        InputError (iterating a dict would read its keys as records)."""
        what = f"{self.option}="
        if isinstance(self.records, Mapping):
            raise InputError(f"{what} is a single dict: give a list of records, e.g. [{{...}}]")
        if isinstance(self.records, (bytes, bytearray)) or not isinstance(self.records, Iterable):
            raise InputError(f"{what} must be a file path, '-' (stdin) or a list of record dicts, "
                             f"not {type(self.records).__name__}")
        self.records = list(self.records)  # a generator is read once, though `read` may run again
        return self.records

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


def _plain(value: Any) -> Any:
    """JSON for the numpy / torch values detector code hands over (np.float32 scores, an
    np.ndarray bbox, a tensor): their plain Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class BoxSource(_RecordSource):
    """Detector boxes: a COCO results array, JSON Lines, detectron2 `instances_predictions.pth`,
    '-' (stdin) or a list of dicts {image_id, bbox XYWH, score[, category_id]}."""

    option = "boxes"
    reader = staticmethod(read_box_records)


class PointSource(_RecordSource):
    """Clicks: records {image_id, points [[x, y], ...], labels [1|0, ...][, bbox, score, category_id]}."""

    option = "points"
    reader = staticmethod(read_point_records)
