"""One record → the small `Label` the review page shows, filters and sorts; the review queue.

A label's *margin* is p1 - p2 of its `topk` ([{category_id, prob}, ...], best first): how far
the chosen class is ahead of the runner-up. Records without `topk` (or with one entry) have no
margin. Records without `score` (a dataset JSON's annotations) count as score 1.0.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

# extra fields shown on the image page when a record carries them (everything mode)
EXTRA_FIELDS = ("stability_score", "point_coords", "detector_score", "detector_category_id")


@dataclass(frozen=True)
class Label:
    """What the page needs of one record. `index`: its position among the image's records;
    `bbox`: XYWH in original pixels; `status`: "matched", "unmatched" or "crowd" with --gt."""

    index: int
    category_id: int
    score: float
    margin: Optional[float] = None
    runner_up: Optional[int] = None  # category id of the second topk entry
    top2: tuple[float, ...] = ()  # (p1, p2) when known
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    status: Optional[str] = None
    extra: tuple[tuple[str, Any], ...] = ()


def _finite(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def top2_margin(topk: Any) -> tuple[Optional[float], Optional[int], tuple[float, ...]]:
    """(p1 - p2, the runner-up's category id, (p1, p2)) of a record's `topk`; (None, None, ())
    when it has fewer than two usable entries. Entries are sorted by probability first, so the
    order they were written in does not matter."""
    if not isinstance(topk, Sequence) or isinstance(topk, (str, bytes)):
        return None, None, ()
    entries = [(_finite(t.get("prob"), -1.0), t.get("category_id")) for t in topk if isinstance(t, Mapping)]
    entries = sorted((e for e in entries if e[0] >= 0), key=lambda e: -e[0])
    if len(entries) < 2:
        return None, None, ()
    (p1, _), (p2, second) = entries[0], entries[1]
    return round(p1 - p2, 6), (int(second) if isinstance(second, (int, float)) else None), (p1, p2)


def make_label(index: int, record: Mapping[str, Any], status: Optional[str] = None) -> Label:
    """The `Label` of `record`, the `index`-th record of its image."""
    margin, runner_up, top2 = top2_margin(record.get("topk"))
    bbox = record.get("bbox") or (0, 0, 0, 0)
    extra = tuple((k, record[k]) for k in EXTRA_FIELDS if k in record)
    return Label(index=index, category_id=int(record["category_id"]), score=_finite(record.get("score", 1.0), 0.0),
                 margin=margin, runner_up=runner_up, top2=top2, bbox=tuple(float(v) for v in bbox[:4]),  # type: ignore[arg-type]
                 status=status, extra=extra)


def is_close(label: Label, close_margin: float) -> bool:
    """Whether the label's top-2 probabilities are within `close_margin` of each other."""
    return label.margin is not None and label.margin < close_margin


@dataclass(order=True)
class QueueItem:
    """A queued label of image number `position` (0-based, in output order)."""

    score: float
    position: int
    index: int
    label: Label = field(compare=False)


class ReviewQueue:
    """The labels to look at first: the `size` lowest-scoring labels, plus the `size` labels with
    the closest top-2 probabilities (margin < `close_margin`), in one list sorted by score
    ascending (ties: image order, then record order). Bounded memory: two heaps of `size`."""

    def __init__(self, size: int = 1000, close_margin: float = 0.1) -> None:
        self.size, self.close_margin = size, close_margin
        self._low: list[tuple[float, int, int, QueueItem]] = []  # max-heap by score (negated keys)
        self._close: list[tuple[float, int, int, QueueItem]] = []  # max-heap by margin
        self.total_close = 0

    @staticmethod
    def _push(heap: list, key: float, item: QueueItem, size: int) -> None:
        entry = (-key, -item.position, -item.index, item)
        if len(heap) < size:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)

    def add(self, position: int, label: Label) -> None:
        if self.size <= 0:
            return
        item = QueueItem(label.score, position, label.index, label)
        self._push(self._low, label.score, item, self.size)
        if is_close(label, self.close_margin):
            self.total_close += 1
            self._push(self._close, label.margin, item, self.size)  # type: ignore[arg-type]

    def low_cutoff(self) -> float:
        """The highest score among the kept lowest-scoring labels once that list is full (labels at
        or below it are there for their score); -inf while every label fits."""
        return -self._low[0][0] if len(self._low) >= self.size > 0 else float("-inf")

    def items(self) -> list[QueueItem]:
        """The queue, lowest score first (each label once)."""
        unique = {(e[3].position, e[3].index): e[3] for e in (*self._low, *self._close)}
        return sorted(unique.values())
