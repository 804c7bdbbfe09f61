"""Read an earlier labeling output back as the engine's entries, without the model.

`read_output(path, ann=None, images=None)` accepts what `ovsam label` writes (and any COCO file of
the same shape):

- a **results array** `[{image_id, category_id, score, bbox, segmentation, ...}]` (also JSON
  Lines, or '-' for standard input). It names neither files, sizes nor classes: images and
  categories come from `ann` (a COCO/LVIS dataset JSON), else from the folder `images`
  (`{image_id:012d}.jpg`, sizes read from the files) with the built-in categories (COCO when
  every category id is a COCO id, else LVIS);
- a **dataset JSON** `{images, annotations, categories}` (ovsam's `--format dataset`, or ground
  truth); `ann` is then not needed.

Every record keeps its fields (everything-mode records keep `stability_score`, `point_coords`,
`topk`), minus a dataset annotation's `id` and `iscrowd`; its `segmentation` (compressed or
uncompressed RLE, or polygons) becomes a compressed RLE with str counts at the image size
(pycocotools), and `area` and `bbox` are added from the mask when absent. `entries()` yields one
`records.Entry` per image in image-id order: the images of a dataset JSON (also those without
annotations), the images a results array mentions. The parsed file is held in memory; masks are
converted one image at a time as `entries()` goes. Mistakes raise `InputError` with one line
naming the file, the record and what is missing. No torch is imported.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from ovsam_model.io.datasets import ImageSource, lvis_file_name
from ovsam_model.io.detections import InputError
from ovsam_model.io.json_files import parse_json, read_text

from .records import Entry, ImageInfo

PathLike = Union[str, Path]
_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_DROPPED_FIELDS = ("id", "iscrowd")  # a dataset annotation's own; the dataset format writes new ones


@dataclass
class LabeledOutput:
    """A labeling output read back: `categories` [{id, name, ...}] and one entry per image.

    `kind` is "results" or "dataset"; `notes` say, for humans, where images and categories came
    from when the file did not say (e.g. the built-in COCO categories)."""

    categories: list[dict]
    kind: str
    source: str
    images: dict[int, ImageInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _records: dict[int, list[tuple[str, dict]]] = field(default_factory=dict, repr=False)

    @property
    def record_count(self) -> int:
        return sum(len(r) for r in self._records.values())

    def entries(self) -> Iterator[Entry]:
        """One entry {"image": {id, file_name, height, width}, "records": [...]} per image, in
        image-id order; records in file order with compressed-RLE segmentations."""
        for image_id in sorted(self.images):
            info = self.images[image_id]
            records = [_normalised(rec, info, where, self.source) for where, rec in self._records.get(image_id, ())]
            yield {"image": dict(info), "records": records}  # type: ignore[typeddict-item]


def read_output(path: PathLike, ann: Optional[PathLike] = None, images: Optional[PathLike] = None) -> LabeledOutput:
    """Read a results array or dataset JSON at `path` ('-': stdin); see the module docstring.
    `ann`: dataset JSON naming the images and categories of a results array. `images`: the
    images folder (sizes and `{image_id:012d}.jpg` names without `ann`; LVIS `coco_url` lookup)."""
    name = "<stdin>" if str(path) == "-" else str(path)
    data = _load_json(path, name)
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list) or not isinstance(data.get("images"), list):
            raise InputError(f"{name}: a JSON object without 'images' and 'annotations' lists: neither a COCO "
                             f"results array nor a dataset JSON")
        return _from_dataset(data, name, images)
    if not isinstance(data, list):
        raise InputError(f"{name}: expected a COCO results array or a dataset JSON, got a JSON {type(data).__name__}")
    return _from_results(data, name, ann, images)


# --- reading files ---------------------------------------------------------------------------

def _load_json(path: PathLike, name: str) -> Any:
    text = sys.stdin.read() if str(path) == "-" else read_text(path, name)
    if not text.strip():
        raise InputError(f"{name}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(text, name)
    return parse_json(text, name)  # raises the one-line message


def _json_lines(text: str, name: str) -> list:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{name}: malformed JSON at line {lineno} column {exc.colno}: {exc.msg}") from None
    return out


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _image_table(data: Mapping, name: str, root: Optional[Path]) -> dict[int, ImageInfo]:
    """A dataset JSON's images → {id: {id, file_name, height, width}} (LVIS: from coco_url)."""
    table: dict[int, ImageInfo] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise InputError(f"{name}: images[{i}] is not an object")
        values = {k: _int(img.get(k)) for k in ("id", "height", "width")}
        for key, value in values.items():
            if value is None:
                raise InputError(f"{name}: images[{i}]: missing or non-integer field '{key}'")
        if "file_name" in img:
            file_name = str(img["file_name"])
        elif "coco_url" in img:
            file_name = lvis_file_name(root, str(img["coco_url"])) if root is not None else \
                Path(str(img["coco_url"])).name
        else:
            raise InputError(f"{name}: images[{i}]: missing field 'file_name' (COCO) or 'coco_url' (LVIS)")
        table[values["id"]] = {"id": values["id"], "file_name": file_name, "height": values["height"],
                               "width": values["width"]}
    return table


def _category_list(data: Mapping, name: str) -> list[dict]:
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise InputError(f"{name}: no 'categories' list")
    out = []
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or _int(cat.get("id")) is None:
            raise InputError(f"{name}: categories[{i}]: missing or non-integer field 'id'")
        out.append({"id": _int(cat["id"]), "name": str(cat.get("name", cat["id"])),
                    **({"supercategory": cat["supercategory"]} if "supercategory" in cat else {})})
    return out


def _checked_record(rec: Any, where: str, name: str) -> tuple[int, dict]:
    if not isinstance(rec, dict):
        raise InputError(f"{name}: {where} is not an object")
    for key in ("image_id", "category_id"):
        if _int(rec.get(key)) is None:
            if isinstance(rec.get("data"), dict):
                raise InputError(f"{name}: a Label Studio tasks file, not a COCO results array or dataset JSON")
            raise InputError(f"{name}: {where}: missing or non-integer field '{key}'")
    if rec.get("segmentation") in (None, ""):
        raise InputError(f"{name}: {where}: no 'segmentation' (a box-only file; `ovsam label` adds the masks)")
    return _int(rec["image_id"]), rec


# --- the two kinds of file -------------------------------------------------------------------

def _from_dataset(data: Mapping, name: str, images: Optional[PathLike]) -> LabeledOutput:
    out = LabeledOutput(categories=_category_list(data, name), kind="dataset", source=name,
                        images=_image_table(data, name, None if images is None else Path(images)))
    for i, ann in enumerate(data["annotations"]):
        image_id, rec = _checked_record(ann, f"annotations[{i}]", name)
        if image_id not in out.images:
            raise InputError(f"{name}: annotations[{i}]: image_id {image_id} is not among its images")
        out._records.setdefault(image_id, []).append((f"annotations[{i}]", rec))
    _check_categories(out, name)
    return out


def _from_results(data: list, name: str, ann: Optional[PathLike], images: Optional[PathLike]) -> LabeledOutput:
    records: dict[int, list[tuple[str, dict]]] = {}
    for i, rec in enumerate(data):
        image_id, rec = _checked_record(rec, f"record {i}", name)
        records.setdefault(image_id, []).append((f"record {i}", rec))
    if ann is not None:
        dataset = _load_json(ann, f"--ann {ann}")
        if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
            raise InputError(f"--ann {ann}: not a COCO/LVIS dataset JSON (needs 'images' and 'categories' lists)")
        table = _image_table(dataset, f"--ann {ann}", None if images is None else Path(images))
        categories = _category_list(dataset, f"--ann {ann}")
        missing = sorted(set(records) - set(table))
        if missing:
            raise InputError(f"{name}: image_id {missing[0]} is not in --ann {ann}"
                             + (f" ({len(missing)} images are not)" if len(missing) > 1 else ""))
        out = LabeledOutput(categories=categories, kind="results", source=name,
                            images={i: table[i] for i in records})
    elif images is not None:
        out = LabeledOutput(categories=_builtin_categories(records), kind="results", source=name,
                            images=_folder_images(Path(images), records))
        out.notes.append(f"images: {images}/{{image_id:012d}}.jpg; categories: the built-in "
                         f"{'COCO' if len(out.categories) == 80 else 'LVIS'} list (no --ann)")
    else:
        raise InputError(f"{name}: a results array names no image files, sizes or classes: give --ann DATASET.json "
                         f"(or --images DIR with {{image_id:012d}}.jpg files)")
    out._records = records
    _check_categories(out, name)
    return out


def _folder_images(root: Path, records: Mapping[int, Any]) -> dict[int, ImageInfo]:
    if not root.is_dir():
        raise InputError(f"--images {root}: no such directory")
    source = ImageSource(root=root)
    table: dict[int, ImageInfo] = {}
    for image_id in sorted(records):
        image = source.get(image_id)
        if image is None:
            raise InputError(f"image {image_id}: {root / f'{image_id:012d}.jpg'} is missing from --images or "
                             f"unreadable (give --ann DATASET.json to name the files)")
        table[image_id] = {"id": image_id, "file_name": image.file_name, "height": image.height, "width": image.width}
    return table


def _builtin_categories(records: Mapping[int, list[tuple[str, dict]]]) -> list[dict]:
    ids = {_int(rec["category_id"]) for recs in records.values() for _, rec in recs}
    for which in ("coco", "lvis"):
        cats = json.loads((_DATA_DIR / f"{which}_categories.json").read_text(encoding="utf-8"))
        if ids <= {c["id"] for c in cats}:
            return [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in cats]
    raise InputError(f"category ids such as {max(ids)} are neither COCO's nor LVIS's: give --ann DATASET.json "
                     f"with the categories")


def _check_categories(out: LabeledOutput, name: str) -> None:
    known = {c["id"] for c in out.categories}
    for recs in out._records.values():
        for where, rec in recs:
            if _int(rec["category_id"]) not in known:
                raise InputError(f"{name}: {where}: category_id {rec['category_id']} is not among the "
                                 f"categories")


# --- masks -----------------------------------------------------------------------------------

def to_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (compressed / uncompressed RLE, or polygons) → compressed RLE
    {"size": [h, w], "counts": str}; ValueError when it is none of these or of another size."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise ValueError("an RLE without a [height, width] 'size'")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise ValueError(f"a mask of size {list(size)} on an image of size {[height, width]}")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts}
        else:
            raise ValueError("an RLE without 'counts'")
    elif isinstance(segmentation, list):
        polygons = [[float(v) for v in p] for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if len(polygons) != len(segmentation):
            raise ValueError("polygons must be lists of at least 3 x, y pairs")
        if not polygons:
            import numpy as np

            rle = mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"a segmentation of type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _is_box(value: Any) -> bool:
    """[x, y, w, h] of finite numbers (what the box formats and the review pages read)."""
    return isinstance(value, list) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _normalised(rec: dict, image: ImageInfo, where: str, name: str) -> dict:
    from pycocotools import mask as mask_utils

    try:
        rle = to_rle(rec["segmentation"], image["height"], image["width"])
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name}: {where} (image {image['id']}): bad segmentation: {exc}") from None
    out = {k: v for k, v in rec.items() if k not in _DROPPED_FIELDS}
    out["segmentation"] = rle
    if out.get("bbox") is not None and not _is_box(out["bbox"]):
        raise InputError(f"{name}: {where} (image {image['id']}): 'bbox' must be [x, y, width, height] numbers, "
                         f"not {json.dumps(out['bbox'])[:80]}")
    if out.get("bbox") is None:
        out["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    if "area" not in out:
        out["area"] = int(mask_utils.area(rle))
    return out
