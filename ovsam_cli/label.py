"""`ovsam label`: detector boxes (or clicks) in, masks and open-vocabulary labels out, as COCO JSON.

The command only wires things together: reading and checking inputs (`ovsam_model.io.detections`,
`.datasets`), decoding in DataLoader workers (`.loader`), the model (`ovsam_model.builder`), and
the resumable writers (`.writers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
from ovsam_model.io.datasets import ImageSource, load_image_source
from ovsam_model.io.detections import (
    InputError,
    PromptSet,
    RawRecord,
    prompts_for,
    read_box_records,
    read_point_records,
    select_prompts,
)
from ovsam_model.io.loader import make_loader
from ovsam_model.io.writers import (
    PartWriter,
    all_part_paths,
    assemble,
    build_records,
    image_entry,
    part_path,
    read_done,
    read_part,
    skipped_entry,
    write_json_atomic,
    write_json_stream,
)
from ovsam_model.types import Predictor
from ovsam_model.vocab import Vocabulary, mismatched_categories, vocabulary_from_categories
from ovsam_model.weights import sha256_of

RANK_WAIT_S = float(os.environ.get("OVSAM_RANK_WAIT_S", 24 * 3600))


class LabelSource(str, Enum):
    ovsam = "ovsam"
    detector = "detector"


class OutputFormat(str, Enum):
    results = "results"
    dataset = "dataset"


@dataclass
class LabelJob:
    """Everything one run needs (picklable: handed to one process per device)."""

    boxes: Optional[str]
    points: Optional[str]
    images: Path
    ann: Optional[Path]
    out: str
    score_thr: float
    max_dets: int
    model: str
    vocab: Optional[str]
    vocab_names: Optional[Path]
    device: str
    batch_size: int
    box_batch: int
    label_source: str
    fmt: str
    polygons: bool
    resume: bool
    amp: bool
    workers: int
    quiet: bool
    topk: int
    roi_box: str = RoiBox.mask.value
    weights: dict[str, Any] = field(default_factory=dict)  # `common.weight_options`: where the weights come from


@dataclass
class RankStats:
    images: int = 0
    prompts: int = 0
    resumed: int = 0
    skipped: Counter = field(default_factory=Counter)


def load_predictor(job: LabelJob, device: str, vocabulary: "str | Vocabulary | None" = None) -> Predictor:
    """The model of `job` on `device` with `vocabulary` (`_vocabulary`'s choice; None: the
    model's default). A seam for tests."""
    from ovsam_model.builder import build_predictor

    return build_predictor(job.model, vocab=vocabulary, names_file=job.vocab_names, device=device, box_chunk=job.box_batch,
                           amp=job.amp, topk=job.topk, roi_box=job.roi_box, **job.weights)


def _vocabulary(job: LabelJob, source: ImageSource) -> tuple["str | Vocabulary | None", str]:
    """(the vocabulary to build with, where it comes from, for humans).

    --vocab wins; else, with --label-source ovsam and an --ann category list, the dataset's own
    categories (the built-in coco / lvis vocabulary when the list is exactly that), so that the
    output ids mean what they mean in --ann; else the model's default.
    """
    if job.vocab is not None:
        return job.vocab, f"--vocab {job.vocab}"
    if job.label_source == LabelSource.ovsam.value and source.categories:
        return vocabulary_from_categories(source.categories, name=f"--ann {Path(job.ann or '').name}"), \
            f"the categories of --ann {job.ann}"
    return None, "the model's default"


def _file_sha256(value: "str | Path | None") -> Optional[str]:
    """sha256 of `value` when it names a file (a --vocab names/embeddings file), else None."""
    if value is None or not Path(value).is_file():
        return None
    return sha256_of(Path(value))


def _fingerprint(job: LabelJob, prompts: PromptSet, predictor: Predictor) -> str:
    """What the part files' contents depend on: the model options, the weights actually loaded,
    the vocabulary (file contents, category ids and names) and the kept prompts."""
    h = hashlib.sha256()
    keys = ("model", "vocab", "vocab_names", "label_source", "polygons", "topk", "amp", "roi_box")
    options: dict[str, Any] = {k: str(v) for k, v in asdict(job).items() if k in keys}
    options["weights_sha256"] = dict(sorted((getattr(predictor, "weights_sha256", None) or {}).items()))
    options["vocab_sha256"] = _file_sha256(job.vocab)
    options["vocab_names_sha256"] = _file_sha256(job.vocab_names)
    options["categories"] = [[int(i), str(n)] for i, n in zip(predictor.category_ids, predictor.class_names)]
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(json.dumps({k: [list(map(str, asdict(p).values())) for p in v] for k, v in sorted(prompts.by_image.items())}).encode())
    return h.hexdigest()[:32]


def _image_ids(job: LabelJob, records: Sequence[RawRecord], prompts: PromptSet, source: ImageSource) -> list[int]:
    """The images this run goes through, sorted: those with kept prompts; for --format dataset
    also every readable image that had input records, all filtered out (listed with no
    annotations)."""
    ids = set(prompts.by_image)
    if job.fmt == OutputFormat.dataset.value:
        ids |= {i for i in {r.image_id for r in records} - ids if source.get(i) is not None}
    return sorted(ids)


def _report_vocabulary(job: LabelJob, source: ImageSource, predictor: Predictor, origin: str) -> None:
    """Say on stderr which vocabulary labels the masks; warn (one line) when a --vocab's ids
    would mean other classes in --ann."""
    info(f"vocabulary: {getattr(getattr(predictor, 'vocabulary', None), 'name', '?')} "
         f"({len(predictor.category_ids)} classes) from {origin}", job.quiet)
    if job.vocab is None or not source.categories or job.quiet:
        return
    bad = mismatched_categories(predictor, source.categories)  # type: ignore[arg-type]  # needs only ids and names
    if bad:
        err_console.print(
            f"warning: {len(bad)} of {len(predictor.category_ids)} --vocab classes have ids that --ann lacks or "
            f"uses for other classes (e.g. {', '.join(bad[:3])}); output category ids follow --vocab",
            style="yellow", markup=False, highlight=False, soft_wrap=True)


def _categories(job: LabelJob, source: ImageSource, predictor: Predictor) -> list[dict]:
    if job.label_source == LabelSource.detector.value and source.categories is not None:
        return source.categories
    return [{"id": int(i), "name": str(n)} for i, n in zip(predictor.category_ids, predictor.class_names)]


def _read_records(job: LabelJob) -> list[RawRecord]:
    require_category = job.label_source == LabelSource.detector.value
    if job.points is not None:
        return read_point_records(job.points, require_category=require_category)
    return read_box_records(job.boxes, require_category=require_category)  # type: ignore[arg-type]


def _check_ann_covers(records: Sequence[RawRecord], source: ImageSource, ann: Optional[Path]) -> None:
    """With --ann, detections of which no image is in it mean the wrong --ann: stop."""
    if ann is None or not records:
        return
    if all(source.get(r.image_id) is None for r in records):
        raise InputError(f"--ann {ann} has none of the images of the prompts (e.g. image_id {records[0].image_id})")


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images · {task.fields[prompts]} prompts · {task.fields[rate]} images/s"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show,
        transient=False,
    )


def run_rank(
    job: LabelJob, rank: int, world: int, device: str
) -> tuple[RankStats, list[dict], PromptSet, Predictor, ImageSource, str, list[int]]:
    """Label this rank's share of the images (every `world`-th id of `_image_ids`).

    Finished images go to this rank's part file (or are returned in memory for stdout output);
    an image that cannot be read is finished too, as a `skipped_entry`. Returns the stats, the
    in-memory entries, the prompts, the predictor, the image source, the resume fingerprint and
    the ids of every rank's images.
    """
    source = load_image_source(job.images, job.ann)
    records = _read_records(job)
    _check_ann_covers(records, source, job.ann)
    try:
        vocabulary, origin = _vocabulary(job, source)
        predictor = load_predictor(job, device, vocabulary)
    except ValueError as exc:  # an unknown vocabulary or model variant
        raise CliError(first_line(exc)) from None
    if rank == 0:
        _report_vocabulary(job, source, predictor, origin)
    mapping = source.category_ids if source.category_ids is not None else list(predictor.category_ids)
    check = source.categories is not None or job.label_source == LabelSource.detector.value
    prompts = select_prompts(
        records,
        image_size=source.size,
        missing_reason=source.missing_reason,
        category_ids=mapping,
        check_categories=check,
        score_thr=job.score_thr,
        max_dets=job.max_dets,
    )
    fingerprint = _fingerprint(job, prompts, predictor)
    image_ids = _image_ids(job, records, prompts, source)
    mine = image_ids[rank::world]
    stats = RankStats()
    entries: list[dict] = []
    writer: Optional[PartWriter] = None
    done: dict[int, dict] = {}
    if job.out != "-":
        writer = PartWriter(part_path(Path(job.out), rank, world), fingerprint, resume=job.resume)
        if job.resume:
            done = {**read_done(Path(job.out), fingerprint), **writer.done}
    todo = [source.get(i) for i in mine if i not in done]
    stats.resumed = len(mine) - len(todo)
    for i in mine:  # images skipped before an interruption still count in the summary
        if i in done and done[i].get("skipped"):
            stats.skipped[done[i]["skipped"]] += len(prompts.by_image.get(i, ()))
    categories = list(predictor.category_ids)
    started = time.monotonic()
    try:
        with _progress(not job.quiet and rank == 0) as progress:
            task = progress.add_task("labeling", total=len(todo), prompts=0, rate="0.0")
            loader = make_loader(todo, predictor.prepare, batch_size=job.batch_size, workers=job.workers)
            for batch in loader:
                new: list[dict] = []
                ok, batch_prompts = [], []
                for item in batch:
                    kept = prompts.by_image.get(item.record.id, [])
                    if item.prepared is None:  # done, without records: merge and --resume go on
                        stats.skipped[item.reason] += len(kept)
                        new.append(skipped_entry(item.record, item.reason or item.error or "unreadable"))
                        if not job.quiet:
                            what = f"{len(kept)} prompts skipped" if kept else "left out of the dataset's images"
                            progress.console.print(f"[yellow]warning:[/] image {item.record.id} ({escape(str(item.record.path))}): {escape(item.error or '')}; {what}")
                    elif not kept:  # --format dataset: listed with no annotations
                        new.append({"image": image_entry(item.record), "records": []})
                        stats.images += 1
                    else:
                        ok.append(item)
                        batch_prompts.append(kept)
                predictions = predictor.predict_prepared([item.prepared for item in ok], [prompts_for(p) for p in batch_prompts]) if ok else []
                for item, kept, prediction in zip(ok, batch_prompts, predictions):
                    recs = build_records(
                        item.record, kept, prediction, category_ids=categories, label_source=job.label_source, polygons=job.polygons
                    )
                    new.append({"image": image_entry(item.record), "records": recs})
                    stats.images += 1
                    stats.prompts += len(kept)
                if writer is not None:
                    writer.append(new)
                else:
                    entries.extend(new)
                elapsed = max(time.monotonic() - started, 1e-9)
                progress.update(task, advance=len(batch), prompts=stats.prompts, rate=f"{stats.images / elapsed:.1f}")
        if writer is not None:
            writer.finish(world)
    finally:
        if writer is not None:
            writer.close()
    return stats, entries, prompts, predictor, source, fingerprint, image_ids


def _wait_for_ranks(out: Path, world: int) -> None:
    """Rank 0 waits until every other rank has marked its part file done for this world size."""
    deadline = time.monotonic() + RANK_WAIT_S
    for rank in range(1, world):
        path = part_path(out, rank, world)
        while not (path.exists() and world in read_part(path).done_worlds):
            if time.monotonic() > deadline:
                raise CliError(f"rank {rank} did not finish ({path}); rerun with --resume")
            time.sleep(1.0)


def merge_output(job: LabelJob, fingerprint: str, categories: list[dict], expected: Sequence[int]) -> int:
    """Merge every part file of `job.out` into the final JSON (atomic), then remove the parts."""
    out = Path(job.out)
    done = read_done(out, fingerprint)
    missing = [i for i in expected if i not in done]
    if missing:
        raise CliError(f"part files lack {len(missing)} images (e.g. image_id {missing[0]}); rerun with --resume")
    obj = assemble([done[i] for i in expected], fmt=job.fmt, categories=categories)
    write_json_atomic(out, obj)
    for path in all_part_paths(out):
        path.unlink()
    return len(obj) if isinstance(obj, list) else len(obj["annotations"])


def _summary(stats: RankStats, prompts: PromptSet, records: int, elapsed: float, world: int) -> None:
    rate = stats.images / elapsed if elapsed > 0 else 0.0
    info(
        f"labeled {stats.images} images, {stats.prompts} prompts → {records} records"
        + (f" ({stats.resumed} images done before --resume)" if stats.resumed else "")
        + (f" on {world} ranks (counts of rank 0)" if world > 1 else "")
        + f" in {elapsed:.1f} s ({rate:.2f} images/s)"
    )
    skipped = prompts.skipped + stats.skipped
    if skipped:
        info(f"skipped {sum(skipped.values())} of {prompts.total} records: " + ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())))
    if prompts.clipped:
        info(f"clipped {prompts.clipped} boxes partly outside their image")


def _run_and_merge(job: LabelJob, rank: int, world: int, device: str, started: float) -> None:
    stats, entries, prompts, predictor, source, fingerprint, image_ids = run_rank(job, rank, world, device)
    if rank != 0:
        return
    categories = _categories(job, source, predictor)
    if job.out == "-":
        obj = assemble(entries, fmt=job.fmt, categories=categories)
        write_json_stream(sys.stdout, obj)
        n = len(obj) if isinstance(obj, list) else len(obj["annotations"])
    else:
        if world > 1:
            _wait_for_ranks(Path(job.out), world)
        n = merge_output(job, fingerprint, categories, image_ids)
    if not job.quiet:
        _summary(stats, prompts, n, time.monotonic() - started, world)


def _shard_worker(rank: int, job: LabelJob, devices: list[str], started: float) -> None:
    """One spawned process of `--devices`: errors become one line and an exit code."""
    try:
        with user_errors(prefix=f"rank {rank}: "):
            _run_and_merge(job, rank, len(devices), devices[rank], started)
    except typer.Exit as exc:  # a plain exit code for torch.multiprocessing, not an exception to relay
        sys.exit(exc.exit_code)


def _device_list(devices: str) -> list[str]:
    """--devices "0,1" (or "cuda:0,cuda:1") → checked torch device strings."""
    out = [resolve_device(f"cuda:{item}" if item.isdigit() else item, option="--devices")
           for item in (part.strip() for part in devices.split(",")) if item]
    if not out:
        raise CliError(f"--devices {devices!r}: give device indices like 0,1")
    return out


def execute(job: LabelJob, devices: Optional[list[str]] = None) -> None:
    """Run `job`: in this process (single rank, or one torchrun rank), or one process per device.

    Ranks: torchrun's WORLD_SIZE / RANK / LOCAL_RANK, else `devices`. Rank r labels the sorted
    image ids r, r + world, ...; rank 0 waits for the others' part files and merges them.
    """
    started = time.monotonic()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if devices and len(devices) > 1 and world == 1:
        if job.out == "-":
            raise CliError("--devices with several devices needs --out FILE")
        import torch.multiprocessing as mp

        try:
            mp.spawn(_shard_worker, args=(job, devices, started), nprocs=len(devices), join=True)
        except mp.ProcessException as exc:
            raise CliError(f"a device process failed ({first_line(exc)}); rerun with --resume", 1) from None
        return
    if world > 1 and job.out == "-":
        raise CliError("several ranks (WORLD_SIZE > 1) need --out FILE")
    device = devices[local_rank % len(devices)] if devices else resolve_device(job.device, local_rank)
    _run_and_merge(job, rank, world, device, started)


def _model_components(model: str) -> tuple[str, ...]:
    """The weight components of `model` (checks the name before any input is read)."""
    from ovsam_model.builder import resolve_spec

    try:
        return resolve_spec(model).components
    except ValueError as exc:  # a ':variant' the model does not take
        raise CliError(first_line(exc)) from None


def label(
    boxes: Annotated[
        Optional[str],
        typer.Option("--boxes", help="Detections: COCO results JSON array, JSON Lines, or detectron2 instances_predictions.pth; '-' reads stdin."),
    ] = None,
    points: Annotated[
        Optional[str],
        typer.Option("--points", help="Clicks instead of boxes: records with image_id, points (a list of x,y pairs) and labels (1 positive, 0 negative per point), JSON or JSON Lines."),
    ] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of the images.")] = None,
    ann: Annotated[
        Optional[Path],
        typer.Option("--ann", help="COCO or LVIS dataset JSON: file names (LVIS: from coco_url), sizes, categories. Without it: DIR/{image_id:012d}.jpg."),
    ] = None,
    out: Annotated[str, typer.Option("--out", help="Output JSON file, or '-' for stdout (written at the end).")] = "-",
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
    box_batch: Annotated[int, typer.Option("--box-batch", min=1, help="Prompts per decoder chunk (bounds memory on images with many boxes).")] = 64,
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
        typer.Option("--format", help="results: COCO results array (loadRes / LVISResults). dataset: COCO dataset JSON (images, categories, annotations)."),
    ] = OutputFormat.results,
    polygons: Annotated[
        bool,
        typer.Option("--polygons", help="Write polygons instead of RLE, for tools that import polygons (Label Studio, CVAT). "
                                        "loadRes and `ovsam eval` read both; RLE is exact, polygons approximate the masks' outer contours."),
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its part file next to --out.")] = False,
    no_amp: Annotated[bool, typer.Option("--no-amp", help="Run in float32 on CUDA (default: bf16 autocast).")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader processes decoding and resizing images.")] = 2,
    topk: Annotated[int, typer.Option("--topk", min=1, help="Alternative labels kept per mask (field 'topk').")] = 5,
    roi_box: RoiBoxOpt = RoiBox.mask,
    quiet: QuietOpt = False,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    checkpoint: CheckpointOpt = None,
    clip_weights: ClipWeightsOpt = None,
) -> None:
    """Masks and open-vocabulary labels for detector boxes (or clicks), written as COCO JSON.

    The prompts come from --boxes (a detector's output) or --points (clicks), the pictures from --images; --ann gives the file names, sizes and categories of a COCO or LVIS dataset.

    Each output record has image_id, category_id, score, bbox (XYWH of the mask), segmentation (compressed RLE at the image size), detector_score, detector_category_id and topk (the best vocabulary labels with their probabilities).

    With --label-source ovsam the score is the detector score times the label probability; with --label-source detector the detector's category and score are kept.

    Vocabulary: --vocab when given (a warning says when its ids would mean other classes in --ann); otherwise, with --label-source ovsam and --ann, the categories of --ann (COCO ids and names for a COCO --ann, LVIS ones for LVIS, a custom dataset's own classes); otherwise the model's default. Which one is used is said on stderr.

    An image that is missing, corrupt or of another size than --ann says is skipped (its prompts are counted in the summary); with --format dataset it is left out of 'images', while a readable image whose detections were all filtered out is listed with no annotations.
    """
    try:
        with user_errors():
            if (boxes is None) == (points is None):
                raise CliError("give exactly one of --boxes and --points")
            if images is None:
                raise CliError("--images DIR is required")
            if resume and out == "-":
                raise CliError("--resume needs --out FILE (stdout output cannot be resumed)")
            if out != "-" and not Path(out).parent.is_dir():
                raise CliError(f"--out {out}: folder {Path(out).parent} does not exist")
            job = LabelJob(
                boxes=boxes,
                points=points,
                images=images,
                ann=ann,
                out=out,
                score_thr=score_thr,
                max_dets=max_dets,
                model=model,
                vocab=vocab,
                vocab_names=vocab_names,
                device=device,
                batch_size=batch_size,
                box_batch=box_batch,
                label_source=label_source.value,
                fmt=fmt.value,
                polygons=polygons,
                resume=resume,
                amp=not no_amp,
                workers=workers,
                quiet=quiet,
                topk=topk,
                roi_box=roi_box.value,
                weights=weight_options(cache_dir, offline, checkpoint, clip_weights, _model_components(model)),
            )
            execute(job, _device_list(devices) if devices else None)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished images are kept, rerun with --resume to continue" if out != "-" else "interrupted")
        raise typer.Exit(130) from None
