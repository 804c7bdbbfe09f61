"""The labeling run: prompts → images decoded in workers → predictor → records → part files →
the output format.

`Labeler` owns one run over one set of images with one predictor. It never holds the whole
result set: finished images go to this rank's part file (`parts.PartWriter`, resumable), and the
output is streamed from the part files into the format (`formats.OutputFormat`) at the end.
Masks are encoded to RLE chunk by chunk by the predictor, so an image with thousands of boxes
never needs thousands of full-size masks.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from ovsam_model.io.datasets import ImageRecord, ImageSource
from ovsam_model.io.detections import EXAMPLES_KEPT, InputError, PromptSet
from ovsam_model.io.uris import local_output

from .formats import OutputFormat, get_format
from .parts import PartIndex, PartWriter, all_part_paths, is_finished, part_path, try_lock
from .records import LABEL_SOURCES, Entry, labeled_entry, skipped_entry
from .sources import PromptSource, SourceContext

RANK_WAIT_S = 24 * 3600.0


class LabelEvents:
    """What a run tells its caller while it goes (the CLI draws a progress bar from it). The
    defaults do nothing."""

    def started(self, total_images: int) -> None:
        """`total_images` are left to label (after --resume)."""

    def batch_done(self, images: int, prompts: int) -> None:
        """A batch of `images` with `prompts` in all is finished."""

    def image_skipped(self, image: ImageRecord, message: str, prompts: int) -> None:
        """`image` could not be used (missing, corrupt, other size): its `prompts` are dropped."""


@dataclass
class LabelSummary:
    """What one run (of this rank) did."""

    images: int = 0  # labeled by this run
    prompts: int = 0  # prompts labeled by this run
    records: Optional[int] = None  # records in the output (rank 0, after the merge)
    resumed: int = 0  # images found done in the part files
    total: int = 0  # input records (of `unit`)
    unit: str = "records"  # what `total` and `skipped` count: the source's `unit`
    clipped: int = 0  # boxes clipped to their image
    skipped: Counter = field(default_factory=Counter)  # reason → dropped records
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason → the first few, named
    elapsed: float = 0.0
    world: int = 1
    out: Optional[Path] = None

    def skip_lines(self) -> list[str]:
        """One "reason: count (e.g. ...)" per reason, sorted."""
        lines = []
        for reason, n in sorted(self.skipped.items()):
            named = self.examples.get(reason)
            lines.append(f"{reason}: {n}" + (f" ({', '.join(named)}{', ...' if n > len(named) else ''})" if named else ""))
        return lines


class Labeler:
    """One labeling run: `predictor` labels the prompts of `source` on the images of `images`.

    label_source "ovsam": category = the model's label, score = detector score × probability;
    "detector": the detector's category and score, the model only adds masks.
    `options`: what else the output depends on, by the option name a user would change (e.g.
    {"--model": "tiny", "--vocab": "coco"}); it joins the part files' fingerprint, so that a
    --resume with other options is refused and the message names them.
    """

    def __init__(
        self,
        predictor: Any,
        images: ImageSource,
        source: PromptSource,
        *,
        label_source: str = "ovsam",
        batch_size: int = 2,
        workers: int = 2,
        strict: bool = False,
        options: Optional[Mapping[str, Any]] = None,
        events: Optional[LabelEvents] = None,
    ) -> None:
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
        self.predictor = predictor
        self.images = images
        self.source = source
        self.label_source = label_source
        self.batch_size = max(1, int(batch_size))
        self.workers = max(0, int(workers))
        self.exif = images.exif  # the frame policy the image source sized the images with
        self.events = events or LabelEvents()
        self.vocabulary_origin = "the predictor's"  # where the vocabulary came from, for humans
        self.warnings: list[str] = []  # for humans, e.g. a vocabulary whose ids mean other classes
        detector = label_source == "detector"
        ctx = SourceContext(
            image_size=images.size,
            missing_reason=images.missing_reason,
            category_ids=images.category_ids if images.category_ids is not None else list(predictor.category_ids),
            check_categories=images.categories is not None or detector,
            require_category=detector,
            strict=strict,
            all_image_ids=images.all_ids,
        )
        self.prompts: PromptSet = source.load(ctx)
        self.image_ids: list[int] = source.run_image_ids(self.prompts, lambda i: images.get(i) is not None)
        self.options = self._options(options or {})
        self.fingerprint = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:32]

    # --- what the output depends on --------------------------------------------------------

    def _options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        p = self.predictor
        options = {str(k): _jsonable(v) for k, v in given.items()}
        options["--label-source"] = self.label_source
        options["--batch-size"] = self.batch_size  # batched convolutions may pick other kernels (cudnn)
        options["--exif"] = self.exif
        options.update(self.source.fingerprint(self.prompts))
        options["weights (sha256)"] = dict(sorted(p.weights_sha256.items()))
        options["vocabulary"] = hashlib.sha256(json.dumps(
            [[int(i), str(n)] for i, n in zip(p.category_ids, p.class_names)]).encode()).hexdigest()[:16]
        return options

    @property
    def categories(self) -> list[dict]:
        """The categories the records' ids refer to: the dataset's with --label-source detector
        (when known), else the predictor's vocabulary."""
        if self.label_source == "detector" and self.images.categories is not None:
            return list(self.images.categories)
        return [{"id": int(i), "name": str(n)} for i, n in zip(self.predictor.category_ids, self.predictor.class_names)]

    # --- labeling ---------------------------------------------------------------------------

    def entries(self, image_ids: Optional[Sequence[int]] = None) -> Iterator[Entry]:
        """Label `image_ids` (default: all of the run) and yield one entry per image, in order.
        Nothing is written; an image that cannot be used yields a skipped entry."""
        from ovsam_model.io.loader import make_loader

        ids = self.image_ids if image_ids is None else list(image_ids)
        todo = [self.images.get(i) for i in ids]
        todo = [r for r in todo if r is not None]
        loader = make_loader(todo, self.source.preparer(self.predictor), batch_size=self.batch_size,
                             workers=self.workers, exif=self.exif)
        for batch in loader:
            out = self.label_loaded(batch)
            yield from out
            self.events.batch_done(len(batch), sum(self.source.count(self.prompts, entry["image"]["id"])
                                                   for entry in out if not entry.get("skipped")))

    def label_loaded(self, batch: Sequence[Any]) -> list[Entry]:
        """The entries of one batch of decoded images (`ovsam_model.io.loader.LoadedImage`s), in
        its order: what `entries()` does with each batch of its DataLoader, and what a Ray actor
        does with each batch it gets (`ray_runner`). See `label_loaded`."""
        return label_loaded(self.predictor, self.source, self.prompts, batch, label_source=self.label_source,
                            events=self.events)

    def label_blocks(self, image_ids: Sequence[int]) -> Iterator[list[Entry]]:
        """Label `image_ids` and yield the finished images in blocks, each appended to the part
        file as one piece by `run`: here `batch_size` entries of `entries()` at a time. A runner
        that labels elsewhere (`ray_runner.RayLabeler`) yields its blocks as they finish, in any
        order, and emits the events itself."""
        block: list[Entry] = []
        for entry in self.entries(image_ids):
            block.append(entry)
            if len(block) >= self.batch_size:
                yield block
                block = []
        yield block

    def run(
        self,
        out: Union[str, Path, None],
        fmt: Union[str, OutputFormat] = "results",
        *,
        resume: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> LabelSummary:
        """Label this rank's share of the images (every `world`-th id) into its part file next to
        `out`; rank 0 then waits for the other ranks and writes `out` (None: standard output) in
        `fmt`, atomically, and removes the part files. `resume`: keep the images already done in
        part files made with the same fingerprint."""
        started = time.monotonic()
        sink = get_format(fmt) if isinstance(fmt, str) else fmt
        target = None if out is None else local_output(out)  # outputs are local files (a URI is a one-line error)
        check_out_target(target, sink)
        if target is None:
            if world > 1:
                raise InputError("several ranks need an output file, not standard output")
            if resume:
                raise InputError("resume needs an output file (standard output cannot be resumed)")
            with tempfile.TemporaryDirectory(prefix="ovsam-label-") as tmp:
                summary = self._run_into(Path(tmp) / "stdout.json", None, sink, False, 0, 1)
        else:
            summary = self._run_into(target, target, sink, resume, rank, world)
        summary.elapsed = time.monotonic() - started
        return summary

    def _run_into(self, parts_at: Path, out: Optional[Path], sink: OutputFormat, resume: bool, rank: int,
                  world: int) -> LabelSummary:
        summary = LabelSummary(total=self.prompts.total, unit=self.source.unit, clipped=self.prompts.clipped,
                               skipped=Counter(self.prompts.skipped), world=world, out=out,
                               examples={k: list(v) for k, v in self.prompts.examples.items()})  # a copy: added to
        mine = self.image_ids[rank::world]
        writer = PartWriter(part_path(parts_at, rank, world), self.fingerprint, self.options, resume=resume)
        try:
            done = dict(writer.done)
            if resume:
                done = {**PartIndex(parts_at, self.fingerprint).entries, **done}
            for image_id in mine:  # images skipped before an interruption still count
                if image_id in done and done[image_id].skipped:
                    self._count_skip(summary, image_id, done[image_id].skipped)
            todo = [i for i in mine if i not in done]
            summary.resumed = len(mine) - len(todo)
            self.events.started(len(todo))
            for block in self.label_blocks(todo):
                for entry in block:
                    if entry.get("skipped"):
                        self._count_skip(summary, entry["image"]["id"], entry["skipped"])
                    else:
                        summary.images += 1
                        summary.prompts += self.source.count(self.prompts, entry["image"]["id"])
                writer.append(block)
            writer.finish(world)
        finally:
            writer.close()
        if rank == 0:
            self._wait_for_ranks(parts_at, world)
            summary.records = self.merge(parts_at, out, sink)
        return summary

    def _count_skip(self, summary: LabelSummary, image_id: int, reason: str) -> None:
        """Count an image found unusable while labeling (e.g. a truncated JPEG) and name it in
        the summary, as the images found unusable before labeling are."""
        summary.skipped[reason] += self.source.skip_count(self.prompts, image_id)
        named = summary.examples.setdefault(reason, [])
        if len(named) < EXAMPLES_KEPT and f"image_id {image_id}" not in named:
            named.append(f"image_id {image_id}")

    def _wait_for_ranks(self, out: Path, world: int) -> None:
        deadline = time.monotonic() + RANK_WAIT_S
        for rank in range(1, world):
            path = part_path(out, rank, world)
            while not is_finished(path, world):
                if time.monotonic() > deadline:
                    raise InputError(f"rank {rank} did not finish ({path}); rerun with --resume")
                time.sleep(1.0)

    def merge(self, parts_at: Path, out: Optional[Path], sink: OutputFormat) -> int:
        """Stream every finished image of this run into `sink` (see `merge_parts`)."""
        return merge_parts(parts_at, self.fingerprint, self.image_ids, out, sink, self.categories)


def check_out_target(out: Optional[Path], sink: OutputFormat) -> None:
    """Refuse (InputError, one line) an `out` that `sink` cannot write (e.g. a folder for a
    one-file format), before any image is labeled rather than at the final rename."""
    try:
        sink.check_out(out)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def label_loaded(predictor: Any, source: PromptSource, prompts: PromptSet, batch: Sequence[Any], *,
                 label_source: str = "ovsam", events: Optional[LabelEvents] = None) -> list[Entry]:
    """The entries of one batch of decoded images (`LoadedImage`s: record, prepared image or the
    error that made it unusable), in the batch's order: `source.label_batch` on the usable ones,
    a skipped entry (and `events.image_skipped`) for the others. `prompts` needs the prompts of
    the batch's images only. The one body of `Labeler.entries()` and of the Ray actors."""
    events = events or LabelEvents()
    out: list[Optional[Entry]] = [None] * len(batch)  # in the batch's order
    ready = []
    for slot, item in enumerate(batch):
        if item.prepared is None:
            events.image_skipped(item.record, item.error or "unreadable", source.skip_count(prompts, item.record.id))
            out[slot] = skipped_entry(item.record, item.reason or "unreadable")
        else:
            ready.append(slot)
    records = source.label_batch(
        predictor, [batch[slot].record for slot in ready], [batch[slot].prepared for slot in ready], prompts,
        category_ids=list(predictor.category_ids), label_source=label_source) if ready else []
    for slot, image_records in zip(ready, records):
        out[slot] = labeled_entry(batch[slot].record, image_records)
    return out  # type: ignore[return-value]


def merge_parts(parts_at: Path, fingerprint: str, image_ids: Sequence[int], out: Optional[Path], sink: OutputFormat,
                categories: Sequence[dict]) -> int:
    """Stream the entries of `image_ids` from the part files of `parts_at` (those made with
    `fingerprint`) into `sink`, in that order, writing `out` (None: stdout); then remove the part
    files. One entry is in memory at a time. Returns the number of records written."""
    index = PartIndex(parts_at, fingerprint)
    missing = index.missing(image_ids)
    if missing:
        raise InputError(f"part files lack {len(missing)} images (e.g. image_id {missing[0]}); rerun with --resume")
    sink.begin(out, categories)
    try:
        for entry in index.read(image_ids):
            sink.add(entry)
        count = sink.end()
    except BaseException:
        sink.abort()
        raise
    for path in all_part_paths(parts_at):  # this run's, and stale ones no live run holds
        handle = try_lock(path)
        if handle is not None:
            path.unlink()
            handle.close()
    return count


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
