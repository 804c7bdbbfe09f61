"""`ovsam show`: a labeling output as a review folder of static pages (overlays, grid, queue).

The command checks its arguments and inputs (files, image ids, every image's presence and size)
before anything is drawn, shows a progress bar while it draws, and leaves the folder in place only
when it is complete. The pages are built by `ovsam_model.review`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ovsam_cli.common import CliError, QuietOpt, err_console, info, user_errors


class Exif(str, Enum):
    auto = "auto"
    apply = "apply"
    ignore = "ignore"


def _existing_file(path: Optional[Path], option: str) -> None:
    if path is not None and str(path) != "-" and not path.is_file():
        raise CliError(f"{option} {path}: file not found" if not path.exists() else f"{option} {path}: not a file")


def _progress(quiet: bool):
    """The library's ReviewEvents as a rich progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovsam_model.review import ReviewEvents

    class Bar(ReviewEvents):
        def __init__(self) -> None:
            self.bar = Progress(TextColumn("drawing"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                                TimeElapsedColumn(), console=err_console, disable=quiet)
            self.task = None

        def started(self, total_images: int) -> None:
            self.bar.start()
            self.task = self.bar.add_task("drawing", total=total_images)

        def image_done(self, card) -> None:
            self.bar.update(self.task, advance=1)

        def stop(self) -> None:
            if self.task is not None:
                self.bar.stop()

    return Bar()


def show(
    pred: Annotated[Path, typer.Option("--pred", help="The labeling output: a COCO results array (ovsam label's default), "
                                                       "JSON Lines of the same records, or a COCO dataset JSON "
                                                       "(--format dataset, everything-mode output, ground truth).")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images (file names relative to it).")],
    out: Annotated[Path, typer.Option("--out", help="Review folder to write (new, empty, or an earlier review: replaced "
                                                    "once the new one is complete). Open OUT/index.html in a browser.")],
    ann: Annotated[Optional[Path], typer.Option("--ann", help="COCO or LVIS dataset JSON naming the images, sizes and "
                                                              "classes of a results array. Default: --gt; without "
                                                              "either, DIR/{image_id:012d}.jpg and the built-in "
                                                              "COCO/LVIS classes.")] = None,
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground truth (COCO/LVIS dataset JSON): each prediction is "
                                                            "marked matched (mask IoU ≥ --iou-thr with a GT instance "
                                                            "of its class) or unmatched, and missed GT instances are "
                                                            "drawn.")] = None,
    page_size: Annotated[int, typer.Option("--page-size", min=1, help="Thumbnails per grid page, and labels per review "
                                                                      "queue page.")] = 100,
    queue_size: Annotated[int, typer.Option("--queue-size", min=0, help="The review queue keeps this many lowest-score "
                                                                        "labels plus this many labels with the "
                                                                        "closest top-2 probabilities.")] = 1000,
    close_margin: Annotated[float, typer.Option("--close-margin", min=0.0, help="Flag labels whose top-2 probabilities "
                                                                               "(field topk) differ by less than "
                                                                               "this.")] = 0.1,
    iou_thr: Annotated[float, typer.Option("--iou-thr", min=0.0, max=1.0, help="Mask IoU for a prediction to match a GT "
                                                                                "instance (with --gt).")] = 0.5,
    exif: Annotated[Exif, typer.Option("--exif", help="EXIF orientation, as in `ovsam label`. auto: per image, the frame "
                                                      "whose size the output gives (the rotated one when both fit). "
                                                      "apply / ignore: always / never rotate.")] = Exif.auto,
    thumb_size: Annotated[int, typer.Option("--thumb-size", min=16, help="Longest side of the grid thumbnails, in "
                                                                         "pixels.")] = 320,
    title: Annotated[str, typer.Option("--title", help="Title of the pages.")] = "ovsam review",
    quiet: QuietOpt = False,
) -> None:
    """Write a review folder for a labeling output: overlays (mask, outline, class and score), grid pages of thumbnails, one page per image, a review queue and per-class counts.

    The folder opens from disk in any browser, with no network and no server. Its pages filter labels by class and score range and sort by score; the filter lives in the URL (index.html#class=person&min=0.2&max=0.8&sort=score-asc), so a filtered view is a link. The review queue lists the lowest-scoring labels and the labels whose two best classes are closest (p1 - p2 of the field topk), lowest score first.

    With --gt, every prediction is marked matched or unmatched (same class, mask IoU ≥ --iou-thr, COCO's greedy order by score; overlapping a crowd region: crowd), and the ground-truth instances no prediction matched are outlined as missed.

    Large sets are paged (--page-size images per grid page, each with a small script of its labels). Images are read with the EXIF rule of `ovsam label` (--exif). A missing image, an image id that --ann or --gt lacks, or an image of another size is reported before anything is drawn.
    """
    try:
        with user_errors():
            if str(pred) != "-":
                _existing_file(pred, "--pred")
            _existing_file(ann, "--ann")
            _existing_file(gt, "--gt")
            if not images.is_dir():
                raise CliError(f"--images {images}: no such directory")
            from ovsam_model.review import ReviewOptions, build_review, check_out

            check_out(out)
            options = ReviewOptions(page_size=page_size, queue_size=queue_size, close_margin=close_margin,
                                    iou_thr=iou_thr, exif=exif.value, thumb_size=thumb_size, title=title)
            progress = _progress(quiet)
            try:
                summary = build_review(pred, images, out, ann=ann, gt=gt, options=options, events=progress)
            finally:
                progress.stop()
    except KeyboardInterrupt:
        err_console.print(f"interrupted; {out} was left as it was", markup=False, highlight=False)
        raise typer.Exit(130) from None
    for note in summary.notes:
        info(f"note: {note}", quiet)
    line = (f"wrote {summary.out}/index.html: {summary.images} images on {summary.grid_pages} grid pages, "
            f"{summary.labels} labels, {summary.queue} in the review queue")
    if gt is not None:
        line += f"; {summary.matched} matched, {summary.unmatched} unmatched, {summary.missed} GT instances missed"
    info(line, quiet)
