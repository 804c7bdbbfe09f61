"""Detector outputs and click files → per-image prompt records.

Two stages, so that whole-file mistakes stop the run before any model is built:

1. `read_box_records` / `read_point_records` parse the file and check its *structure*
   (every record is an object with the required fields of the right JSON types). A violation
   raises `InputError` naming the record and field.
2. `select_prompts` checks each record against the images and categories and drops the
   ones that cannot be used, counting them by reason (`SkipReason`); boxes partly outside
   the image are clipped. Then `--score-thr` and `--max-dets` apply.

Coordinates: input boxes are COCO XYWH in original pixels; `PromptRecord.box` is XYXY in
original pixels (the frame of `ovsam_model.types.Prompts`).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO, Union

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where prompts become tensors, so reading files stays light
    from ovsam_model.types import Prompts

Source = Union[str, Path]


class InputError(ValueError):
    """An input the run cannot proceed with; the message is one line for the user."""


EXAMPLES_KEPT = 3  # skipped records named per reason in messages


class SkipReason:
    """Why a record was dropped (keys of `PromptSet.skipped`)."""

    NON_FINITE = "NaN/inf values"
    NON_POSITIVE = "box with non-positive size"
    OUTSIDE = "box outside the image"
    POINT_OUTSIDE = "point outside the image"
    MALFORMED = "malformed record"
    UNKNOWN_CATEGORY = "unknown category id"
    IMAGE_NOT_IN_ANN = "image not in --ann"
    IMAGE_UNREADABLE = "image file missing or corrupt"
    IMAGE_SIZE_MISMATCH = "image size differs from --ann"
    IMAGE_FLOAT = "float image (no defined white: convert to 8 or 16 bits)"
    BELOW_SCORE_THR = "score below --score-thr"
    OVER_MAX_DETS = "over --max-dets per image"


@dataclass(frozen=True)
class RawRecord:
    """One structurally valid input record, before the per-record checks.

    bbox: COCO XYWH (boxes files; optional in points files).
    category_id: the dataset id, or the 0-based contiguous index when `contiguous` is set
    (detectron2 `instances_predictions.pth`).
    """

    index: int
    image_id: int
    score: float
    category_id: Optional[int] = None
    bbox: Optional[tuple[float, float, float, float]] = None
    points: Optional[tuple[tuple[float, float], ...]] = None
    point_labels: Optional[tuple[int, ...]] = None
    contiguous: bool = False
    problem: Optional[str] = None  # why the record is unusable (lenient reading); None when it is fine


@dataclass(frozen=True)
class PromptRecord:
    """A usable prompt: `index` is the record's position in the input file (output order)."""

    index: int
    image_id: int
    score: float
    category_id: Optional[int]  # dataset category id of the detector (None if not given)
    box: Optional[tuple[float, float, float, float]]  # XYXY original pixels, clipped
    points: Optional[tuple[tuple[float, float], ...]] = None
    point_labels: Optional[tuple[int, ...]] = None


@dataclass
class PromptSet:
    """Kept prompts per image (each list in input order) and counts of what was dropped."""

    by_image: dict[int, list[PromptRecord]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    clipped: int = 0
    total: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason → the first few skipped records, named
    image_ids: set[int] = field(default_factory=set)  # every image id of a structurally valid record

    def skip(self, reason: str, example: str) -> None:
        """Count one dropped record under `reason`, keeping the first few `example`s to name."""
        self.skipped[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < EXAMPLES_KEPT and example not in names:
            names.append(example)

    @property
    def num_prompts(self) -> int:
        return sum(len(v) for v in self.by_image.values())


# ---------------------------------------------------------------------------------------
# stage 1: parsing and structure


BOM = "\ufeff"  # the UTF-8 byte-order mark that Windows tools (PowerShell, Notepad) write first


def _read_text(source: Source, stdin: Optional[TextIO]) -> tuple[str, str]:
    """The text of a prompt file or of stdin ('-'), without a byte-order mark."""
    if str(source) == "-":
        stream = stdin if stdin is not None else sys.stdin
        return stream.read().removeprefix(BOM), "<stdin>"
    from ovsam_model.io.uris import location, read_bytes

    path = location(source)  # a local Path, or a URI read through fsspec
    try:
        text = read_bytes(path).decode("utf-8-sig") if isinstance(path, str) else path.read_text(encoding="utf-8-sig")
        return text, str(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def _parse_json_documents(text: str, name: str) -> list[tuple[Any, str]]:
    """A JSON array or JSON Lines → [(record, where)]; `where` names it in messages."""
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except RecursionError:  # arrays nested thousands deep: json's decoder recurses
            raise InputError(f"{name}: JSON nested too deeply to read") from None
        return [(rec, f"record {i}") for i, rec in enumerate(data)]
    out: list[tuple[Any, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not out and line.lstrip().startswith("{") and _is_dataset_json(line):
            raise InputError(f"{name}: a COCO/LVIS dataset JSON (images, annotations), not detections; "
                             f"give it as --ann and the detector's results array as --boxes")
        try:
            out.append((json.loads(line), f"record {len(out)} (line {lineno})"))
        except RecursionError:
            raise InputError(f"{name}: line {lineno}: JSON nested too deeply to read") from None
        except json.JSONDecodeError as exc:
            if not out:
                try:  # a single pretty-printed object: say what it is rather than "line 1"
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict) and {"images", "annotations"} <= whole.keys():
                    raise InputError(f"{name}: a COCO/LVIS dataset JSON (images, annotations), not detections; "
                                     f"give it as --ann and the detector's results array as --boxes") from None
                if isinstance(whole, dict):
                    raise InputError(
                        f"{name}: a JSON object, expected a JSON array or JSON Lines of detection records"
                    ) from None
            raise InputError(f"{name}: malformed JSON at line {lineno} column {exc.colno}: {exc.msg}") from None
    return out


def _is_dataset_json(line: str) -> bool:
    """A one-line JSON object with `images` and `annotations`: a dataset, not a detection."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and {"images", "annotations"} <= obj.keys()


def _float(value: Union[int, float]) -> float:
    """A JSON number as a float; an integer too large for one (JSON allows any number of digits)
    becomes ±inf, which `select_prompts` skips as non-finite, like 1e400 is."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _number(rec: Mapping, key: str, where: str, name: str) -> float:
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}: {where}: field '{key}' must be a number, got {value!r}")
    return _float(value)


def _image_id(rec: Mapping, where: str, name: str) -> int:
    value = rec["image_id"]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{name}: {where}: field 'image_id' must be an integer, got {value!r}")
    return value


def _require(rec: Any, fields: Sequence[str], where: str, name: str) -> Mapping:
    if not isinstance(rec, dict):
        raise InputError(f"{name}: {where}: expected a JSON object, got {type(rec).__name__}")
    for key in fields:
        if key not in rec:
            raise InputError(f"{name}: {where}: missing field '{key}'")
    return rec


def _bbox(rec: Mapping, where: str, name: str) -> tuple[float, float, float, float]:
    value = rec["bbox"]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
    ):
        raise InputError(f"{name}: {where}: field 'bbox' must be [x, y, width, height], got {value!r}")
    return tuple(_float(v) for v in value)  # type: ignore[return-value]


def _category(rec: Mapping, where: str, name: str) -> Optional[int]:
    if "category_id" not in rec or rec["category_id"] is None:
        return None
    value = rec["category_id"]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: {where}: field 'category_id' must be an integer, got {value!r}")
    return value


def _box_record(
    rec: Any, index: int, where: str, name: str, require_category: bool, contiguous: bool = False
) -> RawRecord:
    fields = ["image_id", "bbox", "score"] + (["category_id"] if require_category else [])
    rec = _require(rec, fields, where, name)
    return RawRecord(
        index=index,
        image_id=_image_id(rec, where, name),
        score=_number(rec, "score", where, name),
        category_id=_category(rec, where, name),
        bbox=_bbox(rec, where, name),
        contiguous=contiguous,
    )


def _unusable(rec: Any, index: int, exc: InputError, name: str) -> RawRecord:
    """A record that failed its structural check, kept (lenient reading) so that `select_prompts`
    counts and names it like every other dropped record."""
    image_id = rec.get("image_id") if isinstance(rec, dict) else None
    if isinstance(image_id, float) and image_id.is_integer():
        image_id = int(image_id)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        image_id = -1
    message = str(exc)
    problem = message[len(name) + 2:] if message.startswith(f"{name}: ") else message
    return RawRecord(index=index, image_id=image_id, score=0.0, problem=problem)


def _checked(records: list[RawRecord], name: str) -> list[RawRecord]:
    """Lenient reading: a file whose every record is unusable is the wrong file, not bad records."""
    if records and all(r.problem is not None for r in records):
        raise InputError(f"{name}: no usable record ({records[0].problem})")
    return records


def _records(docs: list[tuple[Any, str]], name: str, build: Callable[[Any, int, str], RawRecord],
             strict: bool) -> list[RawRecord]:
    """`build` each parsed document into a record; a structural failure refuses the file when
    `strict`, else is kept as an unusable record (see `_unusable`)."""
    out: list[RawRecord] = []
    for i, (rec, where) in enumerate(docs):
        try:
            out.append(build(rec, i, where))
        except InputError as exc:
            if strict:
                raise
            out.append(_unusable(rec, i, exc, name))
    return _checked(out, name)


def _read_detectron2_pth(path: Union[Path, str], require_category: bool, strict: bool) -> list[RawRecord]:
    """detectron2 `instances_predictions.pth`: [{image_id, instances: [{category_id 0-based, bbox XYWH, score}]}]
    (`path`: a local Path, or a URI)."""
    import io

    import torch

    from ovsam_model.io.uris import read_bytes

    target: Any = path
    if isinstance(path, str):
        try:
            target = io.BytesIO(read_bytes(path))
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
    try:
        data = torch.load(target, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as exc:  # torch raises many types for a bad pickle
        # torch's own message suggests weights_only=False: unsafe advice for an untrusted file
        raise InputError(f"{path}: not a readable torch file of detections (loaded safely, weights_only=True; "
                         f"{type(exc).__name__})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of {{image_id, instances}} (detectron2 layout), got {type(data).__name__}")
    out: list[RawRecord] = []
    for i, entry in enumerate(data):
        entry = _require(entry, ["image_id"], f"entry {i}", str(path))
        instances = entry.get("instances", [])
        if not isinstance(instances, list):
            raise InputError(f"{path}: entry {i}: field 'instances' must be a list")
        for j, inst in enumerate(instances):
            if isinstance(inst, dict) and "image_id" not in inst:
                inst = {**inst, "image_id": entry["image_id"]}
            try:
                out.append(_box_record(inst, len(out), f"entry {i} instance {j}", str(path), require_category, True))
            except InputError as exc:
                if strict:
                    raise
                out.append(_unusable(inst, len(out), exc, str(path)))
    return _checked(out, str(path))


def read_box_records(source: Source, *, require_category: bool = False, stdin: Optional[TextIO] = None,
                     strict: bool = True) -> list[RawRecord]:
    """Read `--boxes`: COCO results JSON array, JSON Lines, or detectron2 `.pth` ('-' = stdin; a
    local path, or a URI that fsspec reads, see `ovsam_model.io.uris`).

    Required fields: image_id, bbox (XYWH), score; category_id too when `require_category`.
    `strict`: a record that lacks a field or has one of the wrong type refuses the whole file
    (InputError naming it). Otherwise it is returned with `problem` set, and `select_prompts`
    skips, counts and names it; only a file without a single usable record is refused.
    """
    if str(source) != "-" and Path(source).suffix in (".pth", ".pt"):
        from ovsam_model.io.uris import location

        return _read_detectron2_pth(location(source), require_category, strict)
    text, name = _read_text(source, stdin)
    docs = _parse_json_documents(text, name)
    return _records(docs, name, lambda rec, i, where: _box_record(rec, i, where, name, require_category), strict)


def _point_record(rec: Any, index: int, where: str, name: str, require_category: bool) -> RawRecord:
    rec = _require(rec, ["image_id", "points", "labels"] + (["category_id"] if require_category else []), where, name)
    pts, labels = rec["points"], rec["labels"]
    ok = isinstance(pts, list) and len(pts) > 0 and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        for p in pts
    )
    if not ok:
        raise InputError(f"{name}: {where}: field 'points' must be a non-empty list of [x, y], got {pts!r}")
    if not isinstance(labels, list) or len(labels) != len(pts) or any(l not in (0, 1) or isinstance(l, bool) for l in labels):
        raise InputError(f"{name}: {where}: field 'labels' must be one 1 (positive) or 0 (negative) per point")
    return RawRecord(
        index=index,
        image_id=_image_id(rec, where, name),
        score=_number(rec, "score", where, name) if "score" in rec else 1.0,
        category_id=_category(rec, where, name),
        bbox=_bbox(rec, where, name) if "bbox" in rec else None,
        points=tuple((_float(x), _float(y)) for x, y in pts),
        point_labels=tuple(int(l) for l in labels),
    )


def read_point_records(source: Source, *, require_category: bool = False, stdin: Optional[TextIO] = None,
                       strict: bool = True) -> list[RawRecord]:
    """Read `--points`: records {image_id, points [[x, y], ...], labels [1|0, ...]} (JSON or JSONL).

    Optional: score (default 1), category_id, bbox (XYWH, used together with the points).
    `strict` as in `read_box_records`.
    """
    text, name = _read_text(source, stdin)
    docs = _parse_json_documents(text, name)
    with_box = [isinstance(rec, dict) and "bbox" in rec for rec, _ in docs]
    if any(with_box) and not all(with_box):
        first = with_box.index(not with_box[0])
        raise InputError(f"{name}: {docs[first][1]}: give 'bbox' in every points record or in none")
    return _records(docs, name, lambda rec, i, where: _point_record(rec, i, where, name, require_category), strict)


# ---------------------------------------------------------------------------------------
# stage 2: per-record checks, filtering, grouping

SizeLookup = Callable[[int], Optional[tuple[int, int]]]
"""image_id → (height, width); None when the image cannot be used (the reason is given separately)."""


def _finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _clip_box(bbox: tuple[float, float, float, float], height: int, width: int) -> tuple[Optional[tuple], bool, Optional[str]]:
    """XYWH → clipped XYXY; returns (box, was_clipped, skip_reason)."""
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, False, SkipReason.NON_POSITIVE
    x1, y1, x2, y2 = x, y, x + w, y + h
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
    if cx2 <= cx1 or cy2 <= cy1:
        return None, False, SkipReason.OUTSIDE
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    return (cx1, cy1, cx2, cy2), clipped, None


def select_prompts(
    records: Sequence[RawRecord],
    *,
    image_size: SizeLookup,
    missing_reason: Callable[[int], str],
    category_ids: Optional[Sequence[int]] = None,
    check_categories: bool = True,
    score_thr: float = 0.0,
    max_dets: int = 300,
) -> PromptSet:
    """Per-record checks → kept prompts grouped per image.

    category_ids: the known dataset category ids; sorted ascending, index i is contiguous id i of
    detectron2 files. Ids outside it are skipped when `check_categories` (None: no check, and
    contiguous ids cannot be mapped → skipped).
    missing_reason(image_id): the SkipReason to count when `image_size` returns None.
    max_dets keeps the highest-scoring records per image (ties: earlier record first); the kept
    ones stay in input order.
    """
    known = None if category_ids is None or not check_categories else set(category_ids)
    ordered = None if category_ids is None else sorted(category_ids)
    result = PromptSet(total=len(records))
    for rec in records:
        where = f"record {rec.index}"
        if rec.problem is not None:
            result.skip(SkipReason.MALFORMED, rec.problem)
            continue
        result.image_ids.add(rec.image_id)
        numbers = [rec.score] + list(rec.bbox or ()) + [v for p in rec.points or () for v in p]
        if not _finite(numbers):
            result.skip(SkipReason.NON_FINITE, where)
            continue
        category = rec.category_id
        if category is not None:
            if rec.contiguous:
                category = ordered[category] if ordered is not None and 0 <= category < len(ordered) else None
                if category is None:
                    result.skip(SkipReason.UNKNOWN_CATEGORY, f"{where} (category {rec.category_id})")
                    continue
            elif known is not None and category not in known:
                result.skip(SkipReason.UNKNOWN_CATEGORY, f"category_id {category}")
                continue
        if rec.bbox is not None and (rec.bbox[2] <= 0 or rec.bbox[3] <= 0):
            result.skip(SkipReason.NON_POSITIVE, where)
            continue
        size = image_size(rec.image_id)
        if size is None:
            result.skip(missing_reason(rec.image_id), f"image_id {rec.image_id}")
            continue
        height, width = size
        box = None
        if rec.bbox is not None:
            box, clipped, reason = _clip_box(rec.bbox, height, width)
            if reason is not None:
                result.skip(reason, where)
                continue
            result.clipped += int(clipped)
        if rec.points is not None and not all(0 <= x <= width and 0 <= y <= height for x, y in rec.points):
            result.skip(SkipReason.POINT_OUTSIDE, where)
            continue
        if rec.score < score_thr:
            result.skipped[SkipReason.BELOW_SCORE_THR] += 1
            continue
        result.by_image.setdefault(rec.image_id, []).append(
            PromptRecord(
                index=rec.index,
                image_id=rec.image_id,
                score=rec.score,
                category_id=category,
                box=box,
                points=rec.points,
                point_labels=rec.point_labels,
            )
        )
    for image_id, prompts in result.by_image.items():
        if len(prompts) > max_dets:
            best = sorted(prompts, key=lambda p: (-p.score, p.index))[:max_dets]
            result.skipped[SkipReason.OVER_MAX_DETS] += len(prompts) - len(best)
            result.by_image[image_id] = sorted(best, key=lambda p: p.index)
    return result


def prompts_for(records: Sequence[PromptRecord]) -> Prompts:
    """One image's prompt records → `Prompts` (XYXY boxes and/or points, original pixels).

    Point sets of different lengths are padded with label -1, SAM's "not a point".
    """
    import torch

    from ovsam_model.types import Prompts

    boxes = [r.box for r in records] if records and records[0].box is not None else None
    if not records or records[0].points is None:
        return Prompts(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) if boxes else torch.zeros(0, 4))
    longest = max(len(r.points) for r in records)
    points = torch.zeros(len(records), longest, 2)
    labels = torch.full((len(records), longest), -1, dtype=torch.long)
    for i, r in enumerate(records):
        points[i, : len(r.points)] = torch.tensor(r.points)
        labels[i, : len(r.points)] = torch.tensor(r.point_labels)
    return Prompts(boxes=torch.tensor(boxes) if boxes else None, points=points, point_labels=labels)
