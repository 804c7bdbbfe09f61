"""Where the images are and how big: a COCO / LVIS dataset JSON (`--ann`), or a bare folder.

With `--ann`: COCO images name their file in `file_name`; LVIS v1 images have no `file_name`
and are located through `coco_url` (`http://.../val2017/000000000139.jpg`): the file is
looked up as `DIR/000000000139.jpg` and then `DIR/val2017/000000000139.jpg`.
Without `--ann`, prompts name images by id: `DIR/{image_id:012d}.jpg` (COCO naming); a run over
every image of the folder (segment-everything, `ImageSource.all_ids`) lists its image files
instead. Sizes are read from the file header, in
the frame the images will be decoded in: with the EXIF orientation applied (policy "auto" or
"apply", the detectors' frame), or as stored ("ignore"); see `ovsam_model.io.images`.

`DIR` and `--ann` may be URIs that fsspec reads (`s3://bucket/val2017`, see `ovsam_model.io.uris`):
an `ImageRecord.path` is then a URI (a str), read by the same decoder; a folder is listed with
fsspec's `find`, and LVIS files are looked up in one listing of the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Union
from urllib.parse import urlparse

from PIL import Image

from ovsam_model.io.detections import InputError, SkipReason
from ovsam_model.io.images import check_exif_policy, read_header
from ovsam_model.io.json_files import read_json
from ovsam_model.io.uris import Location, check_folder, exists_under, is_uri, join, list_files, location


# What a folder listing counts as an image (PIL opens more, but these are what datasets hold).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    """One image: `file_name` is relative to the images folder (as written to dataset output);
    `path` is a local Path, or a URI (a str) when the folder is one."""

    id: int
    path: Location
    file_name: str
    height: int
    width: int


@dataclass
class ImageSource:
    """Images of one run, looked up by id. `categories` is None without `--ann`. `exif`: the frame
    policy of the run (folder mode reports sizes in that frame; give the loader the same)."""

    root: Location  # a local folder, or a URI
    categories: Optional[list[dict]] = None
    kind: str = "folder"  # "coco", "lvis" or "folder"
    exif: str = "auto"
    _images: dict[int, ImageRecord] = field(default_factory=dict)
    _unreadable: set[int] = field(default_factory=set)
    _listed: Optional[list[int]] = None

    @property
    def category_ids(self) -> Optional[list[int]]:
        return None if self.categories is None else sorted(c["id"] for c in self.categories)

    def get(self, image_id: int) -> Optional[ImageRecord]:
        """The image, or None (not in --ann; or, without --ann, missing/unreadable file)."""
        if image_id in self._images:
            return self._images[image_id]
        if self.kind != "folder" or image_id in self._unreadable:
            return None
        name = f"{image_id:012d}.jpg"
        size = read_size(join(self.root, name), self.exif)
        if size is None:
            self._unreadable.add(image_id)
            return None
        record = ImageRecord(image_id, join(self.root, name), name, size[0], size[1])
        self._images[image_id] = record
        return record

    def all_ids(self) -> list[int]:
        """Every image of the run, sorted by id: the dataset's with --ann; else the image files of
        the folder and its subfolders (by path), with ids from their names when every name is a
        number (COCO's `000000000139.jpg` is 139), else 1, 2, ... in path order. Files that are not
        images (by extension) are not listed; unreadable ones are listed and skipped later."""
        if self.kind != "folder":
            return sorted(self._images)
        if self._listed is None:
            files = _image_files(self.root)
            stems = [PurePosixPath(name).stem for name, _ in files]
            numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
            ids = [int(s) for s in stems] if numeric else list(range(1, len(files) + 1))
            self._listed = sorted(ids)
            for image_id, (name, path) in zip(ids, files):
                size = read_size(path, self.exif)
                if size is None:
                    self._unreadable.add(image_id)
                    self._images.pop(image_id, None)
                    continue
                self._images[image_id] = ImageRecord(image_id, path, name, size[0], size[1])
        return list(self._listed)

    def size(self, image_id: int) -> Optional[tuple[int, int]]:
        record = self.get(image_id)
        return None if record is None else (record.height, record.width)

    def missing_reason(self, image_id: int) -> str:
        return SkipReason.IMAGE_UNREADABLE if self.kind == "folder" else SkipReason.IMAGE_NOT_IN_ANN


def _image_files(root: Location) -> list[tuple[str, Location]]:
    """The image files (by extension) of `root` and its subfolders: (name relative to `root`,
    path), sorted by name."""
    if isinstance(root, str):
        return [(name, path) for name, path in list_files(root) if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS]
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(((p.relative_to(root).as_posix(), p) for p in files), key=lambda item: item[0])


def read_size(path: Location, exif: str = "auto") -> Optional[tuple[int, int]]:
    """(height, width) from the image header, None if the file is missing or not an image: with
    the EXIF orientation applied ("auto" — there is no dataset size to choose by — or "apply"),
    or as stored ("ignore")."""
    check_exif_policy(exif)
    try:
        header = read_header(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return header.hw(apply_exif=exif != "ignore")


def lvis_file_name(root: Location, url: str, exists: Optional[Callable[[str], bool]] = None) -> str:
    """An LVIS image's file under `root` from its `coco_url`: `NAME`, or `SPLIT/NAME` when only that
    exists (LVIS v1 mixes train2017 and val2017 images). `exists(name)`: whether `root/name`
    exists (default: ask the local file system)."""
    parts = Path(urlparse(url).path).parts
    if not parts:
        return ""
    if exists is None:
        exists = lambda name: (Path(root) / name).exists()  # noqa: E731
    base = parts[-1]
    if not exists(base) and len(parts) >= 2 and exists(f"{parts[-2]}/{base}"):
        return f"{parts[-2]}/{base}"
    return base


def load_image_source(images_dir: Union[str, Path], ann: Union[str, Path, None] = None,
                      exif: str = "auto") -> ImageSource:
    """Index the images of `--images DIR` (and `--ann FILE`). Raises InputError for a bad folder or JSON.
    `exif` ("auto", "apply", "ignore"): the frame policy; without --ann it decides the frame of
    the sizes read from the files (auto = apply), with --ann the sizes are the JSON's. Either may
    be a URI (`ovsam_model.io.uris`)."""
    images_dir = location(images_dir)
    ann = None if ann is None else location(ann)
    try:
        check_exif_policy(exif)
    except ValueError as exc:
        raise InputError(f"--exif: {exc}") from None
    if is_uri(images_dir):
        check_folder(str(images_dir), "--images")
    elif not Path(images_dir).is_dir():
        raise InputError(f"--images {images_dir}: no such directory")
    if ann is None:
        return ImageSource(root=images_dir, exif=exif)
    data = read_json(ann, f"--ann {ann}")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise InputError(f"--ann {ann}: not a COCO/LVIS dataset JSON (needs 'images' and 'categories' lists)")
    source = ImageSource(root=images_dir, categories=[], kind="coco", exif=exif)
    exists = exists_under(images_dir) if isinstance(images_dir, str) else None  # one listing, not a request per image
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise InputError(f"--ann {ann}: categories[{i}]: missing field 'id'")
        source.categories.append({k: cat[k] for k in ("id", "name", "supercategory") if k in cat})
    for i, img in enumerate(data["images"]):
        for key in ("id", "height", "width"):
            if not isinstance(img, dict) or key not in img:
                raise InputError(f"--ann {ann}: images[{i}]: missing field '{key}'")
        if "file_name" in img:
            name = str(img["file_name"])
        elif "coco_url" in img:
            source.kind = "lvis"
            name = lvis_file_name(images_dir, str(img["coco_url"]), exists)
        else:
            raise InputError(f"--ann {ann}: images[{i}]: missing field 'file_name' (COCO) or 'coco_url' (LVIS)")
        image_id = int(img["id"])
        source._images[image_id] = ImageRecord(image_id, join(images_dir, name), name, int(img["height"]),
                                               int(img["width"]))
    return source
