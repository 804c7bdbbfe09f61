"""Build a review folder from a labeling output: `build_review(pred, images, out, ...)`.

The folder is built in a hidden temp folder next to `out` (`.NAME.XXXX.partial`) and renamed
onto `out` when complete, so an interrupted run leaves nothing that looks like a review: a
previous review folder at `out` (it has `ovsam-review.json`) is replaced at the end; any other
non-empty folder is refused. Every written path comes from `safe_relative_path` and is checked
with `inside` before writing: no file of the review can land outside the folder, whatever the
dataset's file names are.

Layout (`REL`: the image's file name made safe and unique by `safe_relative_path`, its extension
replaced; one `used` set per folder, so a file name can never collide with a folder name):

    index.html, grid-0002.html, ...   grid pages of `page_size` thumbnails (page 1 also has the
                                      per-class counts)
    data/grid-NNNN.js                 each grid page's labels, for its filters
    data/meta.js                      categories, pages and their per-class image counts
    queue.html, queue-0002.html, ...  the review queue, `page_size` labels per page
    pages/REL.html                    one page per image: full-size overlay and its labels
    overlays/REL.jpg, thumbs/REL.jpg  the overlays (supervision), full size and thumbnail
    assets/review.css, review.js      shared style and filter script
    ovsam-review.json                 what was built, from what (also marks the folder as ours)
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ovsam_model.atomic import make_temp_directory, replace_directory
from ovsam_model.io.detections import InputError
from ovsam_model.io.images import check_exif_policy

from . import assets
from .html import ImageCard, Site, grid_data_file, grid_file, js_assign, queue_file
from .labels import Label, ReviewQueue, make_label
from .match import MISSED, GroundTruth, load_ground_truth, match_image

PathLike = Union[str, Path]
MARKER = "ovsam-review.json"


@dataclass
class ReviewOptions:
    """`page_size`: thumbnails per grid page and labels per queue page; `queue_size`: how many of
    the lowest-scoring, and how many of the closest top-2, labels the queue keeps; `close_margin`:
    top-2 probabilities closer than this are flagged; `iou_thr`: a prediction matches a GT
    instance of its class at this mask IoU; `exif`: the frame rule of `ovsam_model.io.images`."""

    page_size: int = 100
    queue_size: int = 1000
    close_margin: float = 0.1
    iou_thr: float = 0.5
    exif: str = "auto"
    thumb_size: int = 320
    jpeg_quality: int = 90
    title: str = "ovsam review"

    def check(self) -> None:
        if self.page_size < 1 or self.queue_size < 0 or self.thumb_size < 16:
            raise InputError("page size must be ≥ 1, queue size ≥ 0 and thumbnail size ≥ 16")
        if not 0.0 < self.iou_thr <= 1.0:
            raise InputError(f"IoU threshold must be in (0, 1], got {self.iou_thr}")
        try:
            check_exif_policy(self.exif)
        except ValueError as exc:
            raise InputError(f"--exif: {exc}") from None


@dataclass
class ReviewSummary:
    out: Path
    images: int = 0
    labels: int = 0
    grid_pages: int = 0
    queue: int = 0
    queue_pages: int = 0
    matched: int = 0
    unmatched: int = 0
    missed: int = 0
    notes: list[str] = field(default_factory=list)


class ReviewEvents:
    """Progress hooks (the CLI's progress bar); the defaults do nothing."""

    def started(self, total_images: int) -> None:
        """The inputs are checked; `total_images` will be drawn."""

    def image_done(self, card: ImageCard) -> None:
        """One image's overlay, thumbnail and page are written."""


# --- the output folder ----------------------------------------------------------------------

def check_out(out: PathLike) -> Path:
    """`out` as a Path if a review can be written there: a new or empty folder, or an earlier
    review folder (replaced); InputError otherwise."""
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"--out {out}: a folder that `ovsam show` did not write (no {MARKER}); give a new or empty folder")
    return out


class _Folder:
    """Writes files under the temp folder, refusing any path that would leave it."""

    def __init__(self, root: Path) -> None:
        from ovsam_model.io.safe_paths import inside

        self.root, self._inside = root, inside

    def path(self, relative: str) -> Path:
        target = self.root / relative
        if os.path.isabs(relative) or "\x00" in relative or not self._inside(self.root, target):
            raise RuntimeError(f"refusing to write outside the review folder: {relative!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def text(self, relative: str, text: str) -> None:
        self.path(relative).write_text(text, encoding="utf-8")


# --- inputs -----------------------------------------------------------------------------------

def _check_images(output: Any, images: Path, exif: str, gt: Optional[GroundTruth]) -> None:
    """Every image is in --images, readable, of the size the output says (in the `exif` frame),
    and (with --gt) in the ground truth at that size: InputError naming the first one that is not."""
    from PIL import Image

    from ovsam_model.io.images import choose_frame, read_header

    for image_id, info in sorted(output.images.items()):
        where = f"image {image_id} ({info['file_name']})"
        path = images / info["file_name"]
        if not path.is_file():
            raise InputError(f"{where}: not found in --images {images}")
        try:
            choose_frame(read_header(path), exif, (info["height"], info["width"]))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if gt is not None:
            size = gt.sizes.get(image_id)
            if size is None:
                raise InputError(f"{where}: image id {image_id} is not in --gt {gt.path}")
            if size != (info["height"], info["width"]):
                raise InputError(f"{where}: {size[1]}×{size[0]} in --gt {gt.path} but "
                                 f"{info['width']}×{info['height']} in the predictions")


def _names(categories: Sequence[dict], gt: Optional[GroundTruth]) -> dict[int, str]:
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in (gt.categories if gt else [])}
    names.update({int(c["id"]): str(c.get("name", c["id"])) for c in categories})
    return names


# --- one image ------------------------------------------------------------------------------

@dataclass
class _Drawn:
    card: ImageCard
    labels: list[Label]
    missed: list[tuple[int, list[float]]]
    grid_page: int


class _Builder:
    def __init__(self, folder: _Folder, site: Site, options: ReviewOptions, images: Path,
                 gt: Optional[GroundTruth], events: ReviewEvents) -> None:
        self.folder, self.site, self.options, self.images, self.gt, self.events = folder, site, options, images, gt, events
        self.used: dict[str, set[str]] = {"pages": set(), "overlays": set(), "thumbs": set()}
        self.cards: list[ImageCard] = []
        self.page_data: dict[str, dict] = {}
        self.page_classes: Counter = Counter()
        self.pages: list[dict] = []
        self.counts: dict[int, Counter] = defaultdict(Counter)
        self.queue = ReviewQueue(options.queue_size, options.close_margin)
        self.colors: dict[int, int] = {cid: i for i, cid in enumerate(sorted(site.names))}
        self.pending: Optional[_Drawn] = None

    def add(self, entry: dict) -> None:
        from ovsam_model.io.images import read_image
        from .overlay import Shape, draw_overlay, save_jpeg, shape_text

        info, records = entry["image"], list(entry["records"])
        h, w = int(info["height"]), int(info["width"])
        position = len(self.cards)
        name = str(info["file_name"])
        card = ImageCard(position, int(info["id"]), name, w, h, page=self._name("pages", name, ".html"),
                         overlay=self._name("overlays", name, ".jpg"), thumb=self._name("thumbs", name, ".jpg"))
        gts = self.gt.of(card.id) if self.gt is not None else []
        match = match_image(records, gts, h, w, self.options.iou_thr) if self.gt is not None else None
        labels = [make_label(i, r, match.status[i] if match else None) for i, r in enumerate(records)]
        missed = [(int(gts[j]["category_id"]), [float(v) for v in gts[j].get("bbox", (0, 0, 0, 0))[:4]])
                  for j in (match.missed if match else [])]
        shapes = [Shape(r["segmentation"], label.bbox, label.status or self.colors.get(label.category_id, 0),
                        shape_text(self.site.name(label.category_id), label.score)) for r, label in zip(records, labels)]
        if match:
            shapes += [Shape(match.gt_rles[j], missed_box, MISSED, shape_text("missed " + self.site.name(cat), None),
                             outline_only=True) for j, (cat, missed_box) in zip(match.missed, missed)]
        try:
            pixels = read_image(self.images / card.file_name, exif=self.options.exif, expected_hw=(h, w)).array
        except (OSError, ValueError) as exc:
            raise InputError(f"image {card.id} ({card.file_name}): {str(exc).splitlines()[0] if str(exc) else exc}") from None
        drawn = draw_overlay(pixels, shapes)
        save_jpeg(drawn, self.folder.path(card.overlay), quality=self.options.jpeg_quality)
        card.thumb_size = save_jpeg(drawn, self.folder.path(card.thumb), quality=85, max_side=self.options.thumb_size)
        card.labels, card.missed = len(labels), len(missed)
        self._count(card, labels, missed, gts)
        self.cards.append(card)
        page = position // self.options.page_size + 1
        self.page_data[str(card.id)] = {"l": [[l.category_id, l.score, l.margin, l.status] for l in labels],
                                        "m": [cat for cat, _ in missed]}
        self.page_classes.update({c for c in [l.category_id for l in labels] + [cat for cat, _ in missed]})
        self._write_pending(_Drawn(card, labels, missed, page))
        if len(self.page_data) == self.options.page_size:
            self._flush_page()
        self.events.image_done(card)

    def _name(self, folder: str, file_name: str, suffix: str) -> str:
        """`folder/REL`: `file_name` with its extension replaced by `suffix`, made safe and unique
        within `folder`."""
        from ovsam_model.io.safe_paths import safe_relative_path

        base, dot, ext = file_name.rpartition(".")
        stem = base if dot and base and not any(c in ext for c in "/\\") else file_name
        return f"{folder}/{safe_relative_path(stem + suffix, self.used[folder])}"

    def _count(self, card: ImageCard, labels: list[Label], missed: list, gts: list[dict]) -> None:
        """Per-class counts, and the labels offered to the review queue."""
        for label in labels:
            self.counts[label.category_id]["labels"] += 1
            if label.status:
                self.counts[label.category_id][label.status] += 1
            self.queue.add(card.position, label)
        for g in gts:
            if not g.get("iscrowd"):
                self.counts[int(g["category_id"])]["gt"] += 1
        for cat, _ in missed:
            self.counts[cat][MISSED] += 1

    def _write_pending(self, new: Optional[_Drawn]) -> None:
        """Write the previous image's page, now that its successor (`new`, or None) is known."""
        old, self.pending = self.pending, new
        if old is None:
            return
        prev = self.cards[old.card.position - 1] if old.card.position > 0 else None
        html = self.site.image_page(old.card, old.labels, old.missed, old.grid_page, prev, new.card if new else None)
        self.folder.text(old.card.page, html)

    def _flush_page(self) -> None:
        if not self.page_data and self.pages:
            return
        number = len(self.pages) + 1
        self.folder.text(grid_data_file(number), js_assign("OVSAM_PAGE", self.page_data))
        self.pages.append({"file": grid_file(number), "images": len(self.page_data),
                           "classes": {str(c): n for c, n in sorted(self.page_classes.items())}})
        self.page_data, self.page_classes = {}, Counter()

    def finish(self, summary: ReviewSummary) -> None:
        self._write_pending(None)
        self._flush_page()
        size = self.options.page_size
        items = self.queue.items()
        site = self.site
        site.grid_pages, site.queue_pages = len(self.pages), max(1, -(-len(items) // size))
        present = sorted(c for c, n in self.counts.items() if n.get("labels") or n.get(MISSED) or n.get("gt"))
        meta = {"categories": {str(c): site.name(c) for c in present}, "pages": self.pages, "gt": site.gt,
                "closeMargin": site.close_margin, "queuePages": site.queue_pages, "images": len(self.cards)}
        self.folder.text("data/meta.js", js_assign("OVSAM_META", meta))
        self.folder.text("assets/review.css", assets.CSS)
        self.folder.text("assets/review.js", assets.JS)
        by_position = {card.position: card for card in self.cards}
        cutoff = self.queue.low_cutoff()
        for page in range(1, site.queue_pages + 1):
            chunk = items[(page - 1) * size: page * size]
            self.folder.text(queue_file(page), site.queue_page(page, chunk, by_position, (page - 1) * size, cutoff))
        labels = sum(n["labels"] for n in self.counts.values())
        line = f"{len(self.cards)} images · {labels} labels · {len(present)} classes"
        if site.gt:
            totals = Counter()
            for n in self.counts.values():
                totals.update(n)
            line += f" · {totals['matched']} matched, {totals['unmatched']} unmatched, {totals[MISSED]} GT missed"
            summary.matched, summary.unmatched, summary.missed = totals["matched"], totals["unmatched"], totals[MISSED]
        chart = site.chart({c: self.counts[c] for c in present}, line)
        for number in range(len(self.pages), 0, -1):  # page 1 (index.html) last: the folder's front door
            cards = self.cards[(number - 1) * size: number * size]
            self.folder.text(grid_file(number), site.grid_page(number, cards, chart if number == 1 else ""))
        summary.images, summary.labels, summary.grid_pages = len(self.cards), labels, len(self.pages)
        summary.queue, summary.queue_pages = len(items), site.queue_pages


def build_review(pred: PathLike, images: PathLike, out: PathLike, *, ann: Optional[PathLike] = None,
                 gt: Optional[PathLike] = None, options: Optional[ReviewOptions] = None,
                 events: Optional[ReviewEvents] = None) -> ReviewSummary:
    """Write the review folder `out` for the labeling output `pred` (results array, dataset JSON
    or everything-mode output; see `ovsam_model.labeling.read_output`) over the images folder
    `images`. `ann`: the dataset JSON naming a results array's images (default: `gt`); `gt`: ground
    truth to mark each prediction matched or not and draw the missed instances. Inputs are all
    checked (files, image ids, every image's presence and size) before anything is drawn."""
    from ovsam_model.labeling.read_output import read_output

    options = options or ReviewOptions()
    events = events or ReviewEvents()
    options.check()
    out = check_out(out)
    images = Path(images)
    if not images.is_dir():
        raise InputError(f"--images {images}: no such directory")
    truth = load_ground_truth(Path(gt)) if gt is not None else None
    output = read_output(pred, ann=ann if ann is not None else gt, images=images)
    _check_images(output, images, options.exif, truth)
    site = Site(_names(output.categories, truth), gt=truth is not None, close_margin=options.close_margin,
                title=options.title)
    summary = ReviewSummary(out=out, notes=list(output.notes))
    events.started(len(output.images))
    tmp = make_temp_directory(out, suffix=".partial")
    try:
        builder = _Builder(_Folder(tmp), site, options, images, truth, events)
        for entry in output.entries():
            builder.add(entry)
        builder.finish(summary)
        marker = {"tool": "ovsam show", "pred": str(pred), "ann": None if ann is None else str(ann),
                  "gt": None if gt is None else str(gt), "images": summary.images, "labels": summary.labels,
                  "grid_pages": summary.grid_pages, "queue": summary.queue, "page_size": options.page_size}
        _Folder(tmp).text(MARKER, json.dumps(marker, indent=1) + "\n")
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
