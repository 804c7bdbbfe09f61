"""Prediction → COCO records, resumable part files, and the final results / dataset JSON.

Records (one per kept prompt, in input order within an image):
  image_id, category_id, score, bbox (XYWH of the mask; of the prompt box if the mask is empty),
  segmentation (compressed RLE with str counts at the original size, or polygons), area (mask
  pixels; dataset format only), detector_score, detector_category_id, topk
  ([{category_id, prob}], the model's best labels with their probabilities).

Label sources:
  "ovsam":    category_id = vocabulary category of the model's label,
              score = detector score × label probability.
  "detector": category_id and score are the detector's; the model only adds the mask.

Part files: while a run is going, each finished image is appended as one JSON line to
`<out>.partial.jsonl` (one file per rank: `<out>.partial.rank{r}.jsonl`), flushed and fsynced per
batch. An image that could not be used (missing, corrupt, or of another size than --ann says)
is recorded as done with its skip reason and no records (`skipped_entry`), so merging and
--resume treat it like any finished image. The final output is written to a temp file and
renamed onto `<out>`; records are sorted by image id, then input order, so a resumed run produces
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Optional, Sequence

from ovsam_model.atomic import write_json_atomic as _write_json_atomic
from ovsam_model.io.datasets import ImageRecord
from ovsam_model.io.detections import InputError, PromptRecord
from ovsam_model.io.masks import encode_rle, mask_polygons, rle_area, rle_bbox
from ovsam_model.types import Prediction

LABEL_SOURCES = ("ovsam", "detector")
PART_VERSION = 1


def _r(value: float, digits: int) -> float:
    return round(float(value), digits)


def _prompt_xywh(prompt: PromptRecord) -> list[float]:
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
    else:
        xs = [p[0] for p in prompt.points or ()]
        ys = [p[1] for p in prompt.points or ()]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return [_r(x1, 3), _r(y1, 3), _r(x2 - x1, 3), _r(y2 - y1, 3)]


def build_records(
    image: ImageRecord,
    prompts: Sequence[PromptRecord],
    prediction: Prediction,
    *,
    category_ids: Sequence[int],
    label_source: str = "ovsam",
    polygons: bool = False,
) -> list[dict]:
    """One record per prompt (same order). `category_ids[label]` maps vocabulary index → id."""
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
    if len(prediction) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prediction)} predictions for image {image.id}")
    if len(prompts) and tuple(prediction.masks.shape[1:]) != (image.height, image.width):
        raise ValueError(f"image {image.id}: masks {tuple(prediction.masks.shape[1:])} != image {(image.height, image.width)}")
    rles = encode_rle(prediction.masks)
    areas, boxes = rle_area(rles), rle_bbox(rles)
    labels = prediction.labels.tolist()
    probs = prediction.scores.tolist()
    topk_labels, topk_probs = prediction.topk_labels.tolist(), prediction.topk_scores.tolist()
    out = []
    for i, prompt in enumerate(prompts):
        if label_source == "ovsam":
            category, score = int(category_ids[labels[i]]), prompt.score * probs[i]
        else:
            category, score = prompt.category_id, prompt.score
        segmentation: Any = mask_polygons(prediction.masks[i]) if polygons else rles[i]
        out.append(
            {
                "image_id": image.id,
                "category_id": category,
                "score": _r(score, 6),
                "bbox": [_r(v, 3) for v in boxes[i]] if areas[i] > 0 else _prompt_xywh(prompt),
                "segmentation": segmentation,
                "area": areas[i],
                "detector_score": _r(prompt.score, 6),
                "detector_category_id": prompt.category_id,
                "topk": [
                    {"category_id": int(category_ids[l]), "prob": _r(p, 6)} for l, p in zip(topk_labels[i], topk_probs[i])
                ],
            }
        )
    return out


def image_entry(image: ImageRecord) -> dict:
    return {"id": image.id, "file_name": image.file_name, "height": image.height, "width": image.width}


def skipped_entry(image: ImageRecord, reason: str) -> dict:
    """The part-file entry of an image that was not labeled: done, no records, and why
    (a `SkipReason`); `assemble` leaves it out of a dataset's `images`."""
    return {"image": image_entry(image), "records": [], "skipped": str(reason)}


# ---------------------------------------------------------------------------------------
# part files


def part_path(out: Path, rank: int = 0, world: int = 1) -> Path:
    suffix = ".partial.jsonl" if world == 1 else f".partial.rank{rank}.jsonl"
    return out.with_name(out.name + suffix)


def all_part_paths(out: Path) -> list[Path]:
    """Every part file of `out`, whatever world size wrote it."""
    return sorted(p for p in out.parent.glob(out.name + ".partial*.jsonl") if p.is_file())


@dataclass
class PartContents:
    fingerprint: Optional[str]
    entries: dict[int, dict]  # image_id → {"image": ..., "records": [...]}
    done_worlds: set[int]
    valid_bytes: int  # length of the intact prefix (a torn last line is cut off)


def read_part(path: Path) -> PartContents:
    """Read a part file; a torn or unparsable *last* line (killed mid-write) is ignored."""
    data = path.read_bytes()
    contents = PartContents(None, {}, set(), 0)
    offset = 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        if n == len(lines) - 1:  # b"" after the final newline, or an unterminated (torn) line
            break
        try:
            obj = json.loads(line)
        except ValueError:
            if n == len(lines) - 2 and lines[-1] == b"":  # the last line is garbled
                break
            raise InputError(f"{path}: corrupt part file at line {n + 1}; delete it to start over") from None
        if "ovsam_partial" in obj:
            contents.fingerprint = obj.get("fingerprint")
        elif "done" in obj:
            contents.done_worlds.add(int(obj.get("world", 1)))
        else:
            contents.entries.setdefault(int(obj["image"]["id"]), obj)
        offset += len(line) + 1
        contents.valid_bytes = offset
    return contents


class PartWriter:
    """Appends finished images to this rank's part file (fsync per batch)."""

    def __init__(self, path: Path, fingerprint: str, *, resume: bool) -> None:
        self.path = path
        self.done: dict[int, dict] = {}
        if resume and path.exists():
            contents = read_part(path)
            if contents.fingerprint is not None and contents.fingerprint != fingerprint:
                raise InputError(
                    f"{path} was written with other inputs or options; rerun with them, or without --resume to start over"
                )
            if contents.fingerprint is not None:
                self.done = contents.entries
                with open(path, "r+b") as f:
                    f.truncate(contents.valid_bytes)
                self._file: IO[str] = open(path, "a", encoding="utf-8")
                return
        self._file = open(path, "w", encoding="utf-8")
        self._file.write(json.dumps({"ovsam_partial": PART_VERSION, "fingerprint": fingerprint}) + "\n")
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, entries: Iterable[dict]) -> None:
        for entry in entries:
            self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._sync()

    def finish(self, world: int) -> None:
        self._file.write(json.dumps({"done": True, "world": world}) + "\n")
        self._sync()
        self._file.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_done(out: Path, fingerprint: str) -> dict[int, dict]:
    """Finished images in every part file of `out` made with this fingerprint."""
    done: dict[int, dict] = {}
    for path in all_part_paths(out):
        contents = read_part(path)
        if contents.fingerprint == fingerprint:
            for image_id, entry in contents.entries.items():
                done.setdefault(image_id, entry)
    return done


# ---------------------------------------------------------------------------------------
# final output


def assemble(entries: Iterable[dict], *, fmt: str = "results", categories: Sequence[dict] = ()) -> Any:
    """Per-image entries → the output object, sorted by image id then input order.

    fmt "results": a COCO results array (no `area`: loadRes computes it).
    fmt "dataset": {"images", "categories", "annotations"} with ids 1.., area, iscrowd 0. Every
    entry's image is listed, also one with no records (all its detections filtered out), except
    skipped ones (`skipped_entry`: the image could not be read).
    """
    ordered = sorted(entries, key=lambda e: e["image"]["id"])
    if fmt == "results":
        return [{k: v for k, v in rec.items() if k != "area"} for e in ordered for rec in e["records"]]
    if fmt != "dataset":
        raise ValueError(f"unknown format {fmt!r}")
    annotations = []
    for entry in ordered:
        for rec in entry["records"]:
            annotations.append({"id": len(annotations) + 1, **rec, "iscrowd": 0})
    images = [e["image"] for e in ordered if not e.get("skipped")]
    return {"images": images, "categories": list(categories), "annotations": annotations}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Compact JSON at `path`, written atomically (temp file, fsync, rename)."""
    _write_json_atomic(path, obj)


def write_json_stream(stream: IO[str], obj: Any) -> None:
    json.dump(obj, stream, separators=(",", ":"))
    stream.write("\n")
    stream.flush()
