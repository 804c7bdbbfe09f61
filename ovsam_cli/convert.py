"""`ovsam convert`: an earlier output (results array, dataset JSON) into another format, without
the model; and `output_format`, the format object of `label --format` / `convert --to` with its
options checked.

Reading lives in the model library (`ovsam_model.labeling.read_output`), writing in the formats
(`ovsam_model.labeling.formats`); this module parses options, checks them before anything is
read, and prints one summary line.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ovsam_cli.common import CliError, QuietOpt, first_line, info, user_errors
from ovsam_model.labeling.formats import OutputFormat, format_names

TargetFormat = Enum("TargetFormat", {name: name for name in format_names()}, type=str)  # every registered format

# keyword of a format's constructor → the option that sets it (refused for formats without it)
_OPTION_OF = {"segmentation": "--polygons", "boxes": "--yolo-boxes", "image_root": "--ls-image-root"}


def output_format(
    name: str,
    out: Optional[Path],
    *,
    polygons: bool = False,
    yolo_boxes: bool = False,
    ls_image_root: Optional[str] = None,
    images: Optional[Path] = None,
    model_version: Optional[str] = None,
) -> OutputFormat:
    """A fresh sink of the format `name` for `out` (None: stdout). An option the format does not
    take, an `out` it cannot write (a folder format to stdout) or a missing optional dependency
    is a `CliError`. `images` and `model_version` go to the formats that use them."""
    if name not in OutputFormat.registry:
        raise CliError(f"unknown format {name!r} (known: {', '.join(format_names())})")
    cls = OutputFormat.registry[name]
    takes = inspect.signature(cls.__init__).parameters
    chosen = {"segmentation": "polygons" if polygons else None, "boxes": True if yolo_boxes else None,
              "image_root": ls_image_root}
    for key, value in chosen.items():
        if value is not None and key not in takes:
            raise CliError(f"{_OPTION_OF[key]} does not apply to format {name}")
    context = {"images": images, "model_version": model_version}
    kwargs = {k: v for k, v in {**chosen, **context}.items() if v is not None and k in takes}
    try:
        sink = cls(**kwargs)
        sink.check_out(out)
    except (ImportError, ValueError) as exc:
        raise CliError(first_line(exc)) from None
    return sink


def _check_images_present(data: Any, images: Path) -> None:
    """Every image of `data` is a file under `images` (a name leading outside it counts as missing)."""
    from ovsam_model.io.safe_paths import inside

    root = images.resolve()
    missing = [im for im in data.images.values() if "\x00" in str(im["file_name"])
               or not (inside(root, root / str(im["file_name"])) and (root / str(im["file_name"])).is_file())]
    if missing:
        more = f" ({len(missing)} images are missing)" if len(missing) > 1 else ""
        raise CliError(f"image_id {missing[0]['id']}: {missing[0]['file_name']!r} is not under --images {images}{more}; "
                       "--allow-missing-images converts anyway")


def _summary(fmt: str, out: Optional[str], data: Any, sink: OutputFormat, count: int, quiet: bool) -> None:
    for note in data.notes:
        info(note, quiet)
    images = len(data.images)
    info(f"converted {count} records of {images} images ({data.kind}) → {out or 'stdout'} ({fmt})", quiet)
    if getattr(sink, "dropped", 0):
        info(f"left out {sink.dropped} masks too small for a region or polygon", quiet)
    if getattr(sink, "unlinked", 0):
        info(f"warning: {sink.unlinked} images were not found under --images and are not linked into the dataset",
             quiet)


def convert(
    source: Annotated[str, typer.Argument(
        metavar="INPUT", help="An earlier output: a COCO results array (JSON or JSON Lines) or a COCO dataset JSON; "
                              "'-' reads stdin.")],
    to: Annotated[TargetFormat, typer.Option(
        "--to", help="results: COCO results array. dataset: COCO dataset JSON. yolo: ultralytics YOLO dataset folder. "
                     "labelstudio: Label Studio tasks JSON with predictions.")],
    out: Annotated[str, typer.Option(
        "--out", help="Output file ('-': stdout, for the JSON formats), or folder for yolo (replaced atomically; an "
                      "existing folder only when it is an earlier yolo output).")],
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="Folder of the images: sizes and {image_id:012d}.jpg names of a results array without --ann "
                         "(categories: built-in COCO, else LVIS); yolo links the images into DIR/images.")] = None,
    ann: Annotated[Optional[Path], typer.Option(
        "--ann", help="COCO/LVIS dataset JSON naming the images (file names, sizes) and categories of a results "
                      "array.")] = None,
    polygons: Annotated[bool, typer.Option(
        "--polygons", help="results, dataset: polygons instead of RLE. labelstudio: polygon regions in percent "
                           "coordinates instead of brush masks.")] = False,
    yolo_boxes: Annotated[bool, typer.Option(
        "--yolo-boxes", help="yolo: detection labels 'class cx cy w h' instead of polygons.")] = False,
    ls_image_root: Annotated[Optional[str], typer.Option(
        "--ls-image-root", metavar="URL",
        help="labelstudio: prefix of the task image URLs, followed by the quoted file name (default "
             "/data/local-files/?d= , Label Studio's local-files serving).")] = None,
    allow_missing_images: Annotated[bool, typer.Option(
        "--allow-missing-images", help="With --images: convert even when some images are not under --images (they "
                                       "are left unlinked, with a warning). Default: a missing image is an error.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert an earlier output between formats, without the model.

    A results array names no files, sizes or classes: give --ann (the dataset JSON the labels were made for), or --images with {image_id:012d}.jpg files and the built-in COCO/LVIS categories. A dataset JSON carries all of it. Records keep every field (score, topk, stability_score, point_coords, ...).
    """
    with user_errors():
        for option, path in (("INPUT", None if source == "-" else Path(source)), ("--ann", ann)):
            if path is not None and not path.is_file():
                raise CliError(f"{option} {path}: no such file")
        if images is not None and not images.is_dir():
            raise CliError(f"--images {images}: no such folder")
        target = None if out == "-" else Path(out)
        if target is not None and not target.parent.is_dir():
            raise CliError(f"--out {out}: folder {target.parent} does not exist")
        sink = output_format(to.value, target, polygons=polygons, yolo_boxes=yolo_boxes, ls_image_root=ls_image_root,
                             images=images)
        from ovsam_model.labeling.read_output import read_output

        data = read_output(source, ann=ann, images=images)
        if images is not None and not allow_missing_images:
            _check_images_present(data, images)
        sink.begin(target, data.categories)
        try:
            for entry in data.entries():
                sink.add(entry)
            count = sink.end()
        except BaseException:
            sink.abort()
            raise
        _summary(to.value, None if target is None else str(target), data, sink, count, quiet)
