"""`ovsam label`: detector boxes (or clicks) in, masks and open-vocabulary labels out, as COCO JSON.

The command parses options, checks what it can before torch is imported, builds a run with the
labeling engine (`ovsam_model.labeling`) and prints the summary. Several devices: one process per
device (`--devices`) or torchrun; each labels every world-th image and rank 0 merges.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ovsam_cli.common import (
    CacheDirOpt,
    CheckpointOpt,
    CliError,
    ClipWeightsOpt,
    DeviceOpt,
    OfflineOpt,
    QuietOpt,
    RoiBox,
    RoiBoxOpt,
    VocabNamesOpt,
    VocabOpt,
    err_console,
    first_line,
    info,
    resolve_device,
    user_errors,
    weight_options,
)
from ovsam_model.labeling.api import ModelSettings
from ovsam_model.labeling.engine import LabelEvents
from ovsam_model.labeling.formats import format_names
from ovsam_model.runtime import DistEnv


class LabelSource(str, Enum):
    ovsam = "ovsam"
    detector = "detector"


class Exif(str, Enum):
    auto = "auto"
    apply = "apply"
    ignore = "ignore"


OutputFormat = Enum("OutputFormat", {name: name for name in format_names()}, type=str)  # every registered format


EVERYTHING_PANEL = "Segment everything (--everything)"


RAY_PANEL = "On a Ray cluster (--ray)"


@dataclass
class LabelJob:
    """Everything one run needs (picklable: handed to one process per device)."""

    source: Any  # a `PromptSource`, already read (its structure checked)
    images: Any  # the `ImageSource` of --images / --ann
    ann: Any  # --ann: a local Path, a URI (str), or None
    out: Optional[str]  # None: standard output
    label_source: str
    fmt: str
    polygons: bool
    resume: bool
    batch_size: int
    workers: int
    exif: str
    strict: bool
    quiet: bool
    model: ModelSettings = field(default_factory=ModelSettings)
    sink: Any = None  # the output format, built (its options checked) before the model; None: `fmt`, `polygons`
    ray: Any = None  # a `ray_runner.RaySettings`: label on Ray Data (--ray); None: here


class _Progress(LabelEvents):
    """The engine's events as a rich progress bar and one-line warnings on stderr."""

    def __init__(self, show: bool, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("images · {task.fields[prompts]} prompts · {task.fields[rate]} images/s"),
                            TimeElapsedColumn(), console=err_console, disable=not show)
        self.task = None
        self.images = self.prompts = 0
        self.t0 = time.monotonic()

    def started(self, total_images: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("labeling", total=total_images, prompts=0, rate="0.0")

    def batch_done(self, images: int, prompts: int) -> None:
        self.images += images
        self.prompts += prompts
        rate = self.images / max(time.monotonic() - self.t0, 1e-9)
        self.bar.update(self.task, advance=images, prompts=self.prompts, rate=f"{rate:.1f}")

    def image_skipped(self, image, message: str, prompts: int) -> None:
        if not self.quiet:
            from rich.markup import escape

            what = f"{prompts} prompts skipped" if prompts else "left out of the dataset's images"
            self.bar.console.print(f"[yellow]warning:[/] image {image.id} ({escape(str(image.path))}): "
                                   f"{escape(message)}; {what}", soft_wrap=True)

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()


def _summary(summary, world: int) -> None:
    rate = summary.images / summary.elapsed if summary.elapsed > 0 else 0.0
    info(f"labeled {summary.images} images, {summary.prompts} prompts → {summary.records} records"
         + (f" ({summary.resumed} images done before --resume)" if summary.resumed else "")
         + (f" on {world} ranks (counts of rank 0)" if world > 1 else "")
         + f" in {summary.elapsed:.1f} s ({rate:.2f} images/s)")
    if summary.skipped:
        info(f"skipped {sum(summary.skipped.values())} of {summary.total} {summary.unit}: " + "; ".join(summary.skip_lines()))
    if summary.clipped:
        info(f"clipped {summary.clipped} boxes partly outside their image")


def _open(job: LabelJob, device: str, events: LabelEvents):
    """The engine's run for `job` on `device` (inputs checked before the model is built)."""
    from ovsam_model.labeling import open_labeler

    try:
        return open_labeler(job.images, source=job.source, ann=job.ann, model=replace(job.model, device=device),
                            label_source=job.label_source, batch_size=job.batch_size, workers=job.workers,
                            exif=job.exif, strict=job.strict, events=events, ray=job.ray)
    except ValueError as exc:  # an unknown vocabulary or model variant
        from ovsam_model.io.detections import InputError

        if isinstance(exc, InputError):
            raise
        raise CliError(first_line(exc)) from None


def _run(job: LabelJob, rank: int, world: int, device: str) -> None:
    from ovsam_model.labeling import get_format

    progress = _Progress(show=not job.quiet and rank == 0 and job.ray is None,  # --ray: Ray Data draws its own
                         quiet=job.quiet or rank != 0)
    try:
        labeler = _open(job, device, progress)
        if rank == 0:
            info(f"vocabulary: {labeler.predictor.vocabulary.name} ({len(labeler.predictor.category_ids)} classes) "
                 f"from {labeler.vocabulary_origin}", job.quiet)
            if job.ray is not None:
                info(f"ray: {labeler.ray_plan.describe()}", job.quiet)
            for warning in labeler.warnings:
                if not job.quiet:
                    err_console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
        sink = job.sink or get_format(job.fmt, segmentation="polygons" if job.polygons else "rle")
        summary = labeler.run(None if job.out is None else Path(job.out), sink, resume=job.resume, rank=rank, world=world)
    finally:
        progress.stop()
    if rank == 0 and not job.quiet:
        _summary(summary, world)


def _shard_worker(rank: int, job: LabelJob, devices: list[str]) -> None:
    """One spawned process of `--devices`: errors become one line and an exit code."""
    try:
        with user_errors(prefix=f"rank {rank}: "):
            _run(job, rank, len(devices), devices[rank])
    except typer.Exit as exc:  # a plain exit code for torch.multiprocessing, not an exception to relay
        sys.exit(exc.exit_code)


def _device_list(devices: str) -> list[str]:
    """--devices "0,1" (or "cuda:0,cuda:1") → checked torch device strings."""
    out = [resolve_device(f"cuda:{item}" if item.isdigit() else item, option="--devices")
           for item in (part.strip() for part in devices.split(",")) if item]
    if not out:
        raise CliError(f"--devices {devices!r}: give device indices like 0,1")
    return out


def execute(job: LabelJob, device: str, devices: Optional[str]) -> None:
    """Run `job`: in this process (one rank, or one torchrun rank), or one process per device."""
    env = DistEnv.from_env()
    if job.ray is not None:  # one driver; Ray places the model on the cluster's devices
        if devices or env.distributed:
            raise CliError("--ray runs one driver and places the actors itself: not with --devices or torchrun")
        if device not in ("auto", "cpu"):
            raise CliError(f"--device {device} with --ray: use auto or cpu (Ray gives GPUs to the actors: "
                           f"--ray-gpus-per-actor)")
        _run(job, 0, 1, device)
        return
    listed = _device_list(devices) if devices else None
    if job.model.compile and any(d.split(":")[0] != "cuda" for d in listed or [resolve_device(device)]):
        raise CliError("--compile needs a CUDA device")
    if listed and len(listed) > 1 and not env.distributed:
        if job.out is None:
            raise CliError("--devices with several devices needs --out FILE")
        import torch.multiprocessing as mp

        try:
            mp.spawn(_shard_worker, args=(job, listed), nprocs=len(listed), join=True)
        except mp.ProcessException as exc:
            raise CliError(f"a device process failed ({first_line(exc)}); rerun with --resume", 1) from None
        return
    if env.distributed and job.out is None:
        raise CliError("several ranks (WORLD_SIZE > 1) need --out FILE")
    chosen = listed[env.local_rank % len(listed)] if listed else resolve_device(device, env.local_rank)
    _run(job, env.rank, env.world, chosen)


def _model_components(model: str) -> tuple[str, ...]:
    """The weight components of `model` (checks the name before any input is read)."""
    from ovsam_model.registry import resolve_spec

    try:
        return resolve_spec(model).all_components
    except ValueError as exc:  # a ':variant' the model does not take
        raise CliError(first_line(exc)) from None


def _everything_settings(given: dict[str, Any]) -> Any:
    """The EverythingSettings of the --everything options (None without --everything, where
    they must keep their defaults); a bad value is a one-line error naming the option."""
    from dataclasses import fields

    from ovsam_model.everything import EverythingSettings, option_name

    values = {f.name: given[f.name] for f in fields(EverythingSettings) if f.name in given}
    values["drop_background"] = not given["keep_background"]
    settings = EverythingSettings(**values)
    if not given["everything"]:
        changed = [f.name for f in fields(EverythingSettings) if getattr(settings, f.name) != f.default]
        if changed:
            name = "--keep-background" if changed[0] == "drop_background" else option_name(changed[0])
            raise CliError(f"{name} applies to --everything only")
        return None
    problems = settings.problems()
    if problems:
        raise CliError(problems[0])
    return settings


def _check_prompt_file_options(given: dict[str, Any]) -> None:
    """--score-thr and --max-dets filter a prompt file: with --everything they would be ignored
    silently (a user who means to cap the masks wants --max-masks)."""
    if not given["everything"]:
        return
    defaults = inspect.signature(label).parameters  # the options' own defaults, not copies of them
    if given["score_thr"] != defaults["score_thr"].default:
        raise CliError("--score-thr applies to --boxes and --points only (--everything: --min-label-prob)")
    if given["max_dets"] != defaults["max_dets"].default:
        raise CliError("--max-dets applies to --boxes and --points only (--everything: --max-masks)")


def _ray_settings(given: dict[str, Any]) -> Any:
    """The RaySettings of the --ray options (None without --ray or --ray-address, where the
    others are refused by name). Imports no ray."""
    from ovsam_model.labeling.ray_runner import RaySettings, check_settings

    options = {"ray_actors": "--ray-actors", "ray_gpus_per_actor": "--ray-gpus-per-actor",
               "ray_cpus_per_actor": "--ray-cpus-per-actor", "ray_cpus_per_decoder": "--ray-cpus-per-decoder"}
    if not given["ray"] and given["ray_address"] is None:
        changed = [name for key, name in options.items() if given[key] != (1.0 if key == "ray_cpus_per_decoder" else None)]
        if changed:
            raise CliError(f"{changed[0]} applies to --ray only")
        return None
    settings = RaySettings(address=given["ray_address"], actors=given["ray_actors"],
                           gpus_per_actor=given["ray_gpus_per_actor"], cpus_per_actor=given["ray_cpus_per_actor"],
                           cpus_per_decoder=given["ray_cpus_per_decoder"], progress=not given["quiet"],
                           worker_logs=given["out"] not in (None, "-"))  # stdout carries the labels
    check_settings(settings)
    return settings


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _check_out(out: Optional[str], resume: bool) -> Optional[str]:
    """--out FILE, '-' or nothing → the output path, or None for stdout (refused on a terminal:
    megabytes of JSON there help nobody)."""
    if out is None and _stdout_is_terminal():
        raise CliError("give --out FILE (or --out - to print the JSON here, or pipe stdout to a file)")
    if out in (None, "-"):
        if resume:
            raise CliError("--resume needs --out FILE (stdout output cannot be resumed)")
        return None
    from ovsam_model.io.uris import local_output

    local = local_output(out)  # a URI is refused: the output, its part file and its lock are local files
    if out.startswith("file://"):
        out = str(local)
    if not Path(out).parent.is_dir():
        raise CliError(f"--out {out}: folder {Path(out).parent} does not exist")
    return out


def label(
    boxes: Annotated[
        Optional[str],
        typer.Option("--boxes", help="Detections: COCO results JSON array, JSON Lines, or detectron2 instances_predictions.pth; '-' reads stdin. A local path or a URI (s3://, gs://, ...; see --images)."),
    ] = None,
    points: Annotated[
        Optional[str],
        typer.Option("--points", help="Clicks instead of boxes: records with image_id, points (a list of x,y pairs) and labels (1 positive, 0 negative per point), JSON or JSON Lines. A local path or a URI (see --images)."),
    ] = None,
    everything: Annotated[
        bool,
        typer.Option("--everything", help="No prompts needed: segment every image of --images (or of --ann) from a grid of clicks and name every mask. "
                                          "Records add stability_score and point_coords; score = stability × label probability.",
                     rich_help_panel=EVERYTHING_PANEL),
    ] = False,
    images: Annotated[Optional[str], typer.Option("--images", metavar="DIR", help="Folder of the images: a local path, or a URI that fsspec reads (s3://bucket/val2017, gs://..., az://...; "
                                                                                  "install the protocol's package, e.g. s3fs or gcsfs; credentials as that package reads them, e.g. AWS_PROFILE).")] = None,
    ann: Annotated[
        Optional[str],
        typer.Option("--ann", metavar="FILE", help="COCO or LVIS dataset JSON: file names (LVIS: from coco_url), sizes, categories. Without it: DIR/{image_id:012d}.jpg. A local path or a URI (see --images)."),
    ] = None,
    out: Annotated[
        Optional[str],
        typer.Option("--out", help="Output file ('-': stdout). Written at the end, atomically. Default: stdout when it is a pipe or file; required on a terminal. Always local (not a URI): copy it to object storage afterwards."),
    ] = None,
    score_thr: Annotated[float, typer.Option("--score-thr", help="Drop detections with a detector score below this.")] = 0.0,
    max_dets: Annotated[int, typer.Option("--max-dets", min=1, help="Keep at most this many detections per image (highest scores).")] = 300,
    model: Annotated[str, typer.Option("--model", help="Model name (see `ovsam weights list`).")] = "ovsam-rn50x16-lvis",
    vocab: VocabOpt = None,
    vocab_names: VocabNamesOpt = None,
    device: DeviceOpt = "auto",
    devices: Annotated[
        Optional[str],
        typer.Option("--devices", help="Several GPUs, e.g. 0,1: one process per device, images sharded, one merged output (or use torchrun)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per model batch.")] = 2,
    box_batch: Annotated[int, typer.Option("--box-batch", min=1, help="Prompts per decoder chunk: bounds memory on images with many boxes.")] = 64,
    label_source: Annotated[
        LabelSource,
        typer.Option(
            "--label-source",
            help="ovsam: open-vocabulary label, score = detector score × label probability. "
            "detector: keep the detector's category and score, only add masks.",
        ),
    ] = LabelSource.ovsam,
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", help="results: COCO results array (loadRes / LVISResults / FiftyOne). dataset: COCO dataset JSON (images, categories, annotations: CVAT, supervision). "
                                      "yolo: ultralytics YOLO-seg dataset folder (--out DIR: labels/*.txt, data.yaml, images/ linked). labelstudio: Label Studio tasks JSON with predictions."),
    ] = "results",  # type: ignore[assignment]
    polygons: Annotated[
        bool,
        typer.Option("--polygons", help="Write polygons instead of RLE, for tools that import polygons (Label Studio, CVAT). "
                                        "loadRes and `ovsam eval` read both; RLE is exact, polygons approximate the masks' outer contours. "
                                        "With --format labelstudio: polygon regions in percent instead of brush masks."),
    ] = False,
    yolo_boxes: Annotated[bool, typer.Option("--yolo-boxes", help="With --format yolo: detection labels 'class cx cy w h' instead of polygons.")] = False,
    ls_image_root: Annotated[
        Optional[str],
        typer.Option("--ls-image-root", metavar="URL", help="With --format labelstudio: prefix of the task image URLs, followed by the quoted file name (default /data/local-files/?d= , Label Studio's local-files serving)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its part file next to --out (same inputs and options).")] = False,
    no_amp: Annotated[bool, typer.Option("--no-amp", help="Run in float32 on CUDA (default: bf16 autocast).")] = False,
    cpu_bf16: Annotated[bool, typer.Option("--cpu-bf16", help="Run OVSAM models under bf16 autocast on CPU too, as on CUDA: about 1.8x faster on CPUs with native bf16 (AVX512-BF16 or AMX), slower on others; masks agree with float32 at IoU >= 0.98.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the CLIP trunk and the SAM2CLIP adapter (OVSAM models, CUDA only): the first batch compiles, later ones run faster.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader processes decoding and resizing images.")] = 2,
    topk: Annotated[int, typer.Option("--topk", min=1, help="Alternative labels kept per mask (field 'topk').")] = 5,
    roi_box: RoiBoxOpt = RoiBox.mask,
    exif: Annotated[
        Exif,
        typer.Option("--exif", help="EXIF orientation. auto: per image, the frame whose size --ann gives (the rotated one when both fit); "
                                    "without --ann, applied as detectors do. apply / ignore: always / never rotate."),
    ] = Exif.auto,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse the whole prompt file at its first malformed record (default: skip, count and name such records).")] = False,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build the model with random weights (no download): for timing only, the labels are meaningless.")] = False,
    points_per_side: Annotated[int, typer.Option("--points-per-side", help="Clicks per side of the grid (the whole image; crop layers scale it down by --crop-n-points-downscale-factor).", rich_help_panel=EVERYTHING_PANEL)] = 32,
    points_per_batch: Annotated[int, typer.Option("--points-per-batch", help="Clicks decoded at once: bounds memory, not results.", rich_help_panel=EVERYTHING_PANEL)] = 64,
    crop_n_layers: Annotated[int, typer.Option("--crop-n-layers", help="Crop layers on top of the whole image: layer i runs the grid again on 4^i overlapping crops (finds small objects; slower).", rich_help_panel=EVERYTHING_PANEL)] = 0,
    crop_overlap_ratio: Annotated[float, typer.Option("--crop-overlap-ratio", help="Overlap of neighbouring crops, as a fraction of the crop size on layer 1.", rich_help_panel=EVERYTHING_PANEL)] = 512 / 1500,
    crop_n_points_downscale_factor: Annotated[int, typer.Option("--crop-n-points-downscale-factor", help="Layer i's grid has --points-per-side / factor^i clicks per side.", rich_help_panel=EVERYTHING_PANEL)] = 1,
    stability_score_thresh: Annotated[float, typer.Option("--stability-score-thresh", help="Keep masks whose stability (IoU of the mask thresholded at ±offset) is at least this, in [0, 1].", rich_help_panel=EVERYTHING_PANEL)] = 0.95,
    stability_score_offset: Annotated[float, typer.Option("--stability-score-offset", help="Logit offset of the stability score.", rich_help_panel=EVERYTHING_PANEL)] = 1.0,
    min_label_prob: Annotated[float, typer.Option("--min-label-prob", help="Drop masks whose best label has a lower probability, in [0, 1].", rich_help_panel=EVERYTHING_PANEL)] = 0.0,
    keep_background: Annotated[bool, typer.Option("--keep-background", help="Keep masks the model calls background (default: drop them); e.g. for class-agnostic proposals.", rich_help_panel=EVERYTHING_PANEL)] = False,
    box_nms_thresh: Annotated[float, typer.Option("--box-nms-thresh", help="Box IoU above which the lower-scoring of two masks of one crop is dropped, in [0, 1].", rich_help_panel=EVERYTHING_PANEL)] = 0.7,
    crop_nms_thresh: Annotated[float, typer.Option("--crop-nms-thresh", help="Box IoU above which duplicates from different crops are dropped (the smaller crop's mask wins), in [0, 1].", rich_help_panel=EVERYTHING_PANEL)] = 0.7,
    min_mask_region_area: Annotated[int, typer.Option("--min-mask-region-area", help="Fill holes and drop islands smaller than this many pixels (0: off; needs OpenCV).", rich_help_panel=EVERYTHING_PANEL)] = 0,
    max_masks: Annotated[int, typer.Option("--max-masks", help="Masks kept per image, best score first (0: all).", rich_help_panel=EVERYTHING_PANEL)] = 1000,
    quiet: QuietOpt = False,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    checkpoint: CheckpointOpt = None,
    clip_weights: ClipWeightsOpt = None,
    ray: Annotated[bool, typer.Option("--ray", help="Label on Ray Data: images decoded in CPU tasks, the model in actors (one model each, on a GPU, or CPU actors where the cluster has none), "
                                                  "each finished block written to the part file at once. Starts a local Ray instance unless --ray-address is given. The output, --resume and the summary are those of a run without Ray.", rich_help_panel=RAY_PANEL)] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDR", help="Join this Ray cluster (implies --ray): auto (the cluster this machine is part of, e.g. in a Ray job), HOST:PORT (its GCS), or ray://HOST:10001 (Ray Client).", rich_help_panel=RAY_PANEL)] = None,
    ray_actors: Annotated[Optional[int], typer.Option("--ray-actors", help="Predictor actors (default: one per GPU of the cluster; without GPUs, one per 8 CPUs).", rich_help_panel=RAY_PANEL)] = None,
    ray_gpus_per_actor: Annotated[Optional[float], typer.Option("--ray-gpus-per-actor", help="GPUs of each actor (default: 1 where the cluster has GPUs, else 0: CPU actors; a fraction shares a GPU).", rich_help_panel=RAY_PANEL)] = None,
    ray_cpus_per_actor: Annotated[Optional[float], typer.Option("--ray-cpus-per-actor", help="CPUs of each actor, also its torch threads (default: 1 with GPUs; CPU actors share half the CPUs).", rich_help_panel=RAY_PANEL)] = None,
    ray_cpus_per_decoder: Annotated[float, typer.Option("--ray-cpus-per-decoder", help="CPUs of each image decoding task.", rich_help_panel=RAY_PANEL)] = 1.0,
) -> None:
    """Masks and open-vocabulary labels for detector boxes, clicks, or everything in the image, written as COCO JSON.

    The prompts come from --boxes (a detector's output), --points (clicks) or --everything (a grid of clicks on every image, no detector needed), the pictures from --images; --ann gives the file names, sizes and categories of a COCO or LVIS dataset (without it, --everything labels every image file of the folder, ids from numeric names or 1, 2, ... in path order).

    --everything follows segment-anything's automatic mask generator (its grid, crops, stability score and NMS), with one mask per click, only stable masks classified, masks the model calls background dropped, and score = stability × label probability.

    Each output record has image_id, category_id, score, bbox (XYWH of the mask), segmentation (compressed RLE at the image size), detector_score, detector_category_id and topk (the best vocabulary labels with their probabilities).

    With --label-source ovsam the score is the detector score times the label probability; with --label-source detector the detector's category and score are kept.

    Vocabulary: --vocab when given (a warning says when its ids would mean other classes in --ann); otherwise, with --label-source ovsam and --ann, the categories of --ann (COCO ids and names for a COCO --ann, LVIS ones for LVIS, a custom dataset's own classes); otherwise the model's default. Which one is used is said on stderr.

    A malformed record (no bbox, wrong types) is skipped and named in the summary (--strict refuses the file instead). An image that is missing, corrupt, of another size than --ann says, or of float pixels is skipped (its prompts are counted in the summary); with --format dataset it is left out of 'images', while a readable image whose detections were all filtered out is listed with no annotations. 16-bit images are scaled to 8 bits by their full range.
    """
    try:
        with user_errors():
            everything_settings = _everything_settings(locals())
            _check_prompt_file_options(locals())
            given = {k: v for k, v in (("boxes", boxes), ("points", points), ("everything", everything_settings))
                     if v is not None}
            if len(given) != 1:
                raise CliError("give exactly one of --boxes, --points and --everything")
            if images is None:
                raise CliError("--images DIR is required")
            if "-" in (boxes, points) and _stdin_is_terminal():  # it would wait for typed JSON, silently
                raise CliError(f"--{'boxes' if boxes == '-' else 'points'} - reads standard input, which is this "
                               f"terminal: pipe the records in (detector ... | ovsam label ...) or give a file")
            from ovsam_model.io.uris import location

            images_at = location(images)  # a local Path, or a URI read through fsspec (imported only then)
            ann_at = None if ann is None else location(ann)
            ray_job = _ray_settings(locals())
            target = _check_out(out, resume)
            if target is not None:
                from ovsam_model.labeling.api import check_out_not_input

                check_out_not_input(target, {"--boxes": boxes, "--points": points, "--ann": ann})
                from ovsam_model.labeling.parts import check_not_running

                env = DistEnv.from_env()
                check_not_running(Path(target), env.rank, env.world)
            if random_weights:
                info("warning: --random-weights: the model has random weights; masks and labels are meaningless", quiet)
            from ovsam_model.labeling import check_inputs, make_source

            (option, value), = given.items()
            source = make_source(option, value) if everything else make_source(option, value, score_thr=score_thr,
                                                                                 max_dets=max_dets)
            image_source = check_inputs(images_at, source, ann=ann_at, exif=exif.value, label_source=label_source.value,
                                        strict=strict)  # before torch is imported: mistakes show at once
            from ovsam_cli.convert import output_format

            local_images = images_at if isinstance(images_at, Path) else None  # what --format yolo can link
            if local_images is None and fmt.value == "yolo":
                info(f"warning: --format yolo: images under --images {images} are not linked into {target}/images "
                     f"(a URI); copy them there", quiet)
            sink = output_format(fmt.value, None if target is None else Path(target), polygons=polygons,
                                 yolo_boxes=yolo_boxes, ls_image_root=ls_image_root, images=local_images,
                                 model_version=model)
            if target is not None:
                from ovsam_model.labeling.engine import check_out_target

                check_out_target(Path(target), sink)
            job = LabelJob(
                source=source, images=image_source, ann=ann_at, out=target, label_source=label_source.value, fmt=fmt.value, polygons=polygons, resume=resume,
                batch_size=batch_size, workers=workers, exif=exif.value, strict=strict, quiet=quiet, sink=sink, ray=ray_job,
                model=ModelSettings(model=model, vocab=vocab, vocab_names=vocab_names, box_batch=box_batch,
                                    amp=not no_amp, topk=topk, roi_box=roi_box.value, random_weights=random_weights,
                                    compile=compile_, cpu_bf16=cpu_bf16,
                                    weights=weight_options(cache_dir, offline, checkpoint, clip_weights,
                                                           _model_components(model))),
            )
            execute(job, device, devices)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished images are kept, rerun with --resume to continue"
                          if out not in (None, "-") else "interrupted")
        raise typer.Exit(130) from None
