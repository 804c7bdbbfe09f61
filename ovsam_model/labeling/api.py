"""The labeling engine's front door: `label_images` (one call, writes a file) and `open_labeler`
(a ready `Labeler`, e.g. to iterate over records in a notebook).

    from ovsam_model import label_images
    summary = label_images("val2017/", boxes="dets.json", ann="instances_val2017.json",
                           out="labeled.json", model="ovsam-rn50x16-lvis")

Inputs are read and checked before the model is built, so a bad file fails in a second.
`ovsam label` is this function behind a command line: both produce identical records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ovsam_model.io.datasets import ImageSource, load_image_source
from ovsam_model.io.detections import InputError
from ovsam_model.io.uris import local_output, location

from .engine import LabelEvents, Labeler, LabelSummary, check_out_target
from .formats import OutputFormat, get_format
from .parts import check_not_running
from .sources import PromptSource, make_source

PathLike = Union[str, Path]


@dataclass
class ModelSettings:
    """How to build the predictor (`ovsam_model.builder.build_predictor`'s options).

    `weights`: cache_dir, offline, overrides ({component: path}), clip_weights.
    """

    model: str = "ovsam-rn50x16-lvis"
    vocab: Optional[str] = None
    vocab_names: Optional[Path] = None
    device: str = "auto"
    box_batch: int = 64
    amp: bool = True
    cpu_bf16: bool = False  # bf16 autocast on CPU too (OVSAM)
    topk: int = 5
    roi_box: str = "mask"
    random_weights: bool = False
    weights: dict[str, Any] = field(default_factory=dict)
    compile: bool = False  # torch.compile the CLIP trunk and the SAM2CLIP adapter (OVSAM on CUDA)

    @property
    def bf16_on_cpu(self) -> bool:
        """Whether `cpu_bf16` takes effect: the run's device is a CPU (on CUDA, `amp` decides)."""
        return self.cpu_bf16 and resolve_device(self.device).startswith("cpu")

    def options(self) -> dict[str, Any]:
        """What the output depends on, by the option name a user changes (resume fingerprint)."""
        from ovsam_model.weights import sha256_of

        def file_sha(value: Any) -> Optional[str]:
            return sha256_of(Path(value)) if value is not None and Path(value).is_file() else None

        return {"--model": self.model, "--vocab": None if self.vocab is None else str(self.vocab),
                "--vocab (file sha256)": file_sha(self.vocab), "--vocab-names (file sha256)": file_sha(self.vocab_names),
                "--topk": self.topk, "--no-amp": not self.amp, "--roi-box": self.roi_box,
                "--random-weights": self.random_weights,
                # the decoder's GEMMs may round differently for other chunk sizes (seen on CPU for
                # chunks of 1), so a resume must not mix two answers
                "--box-batch": self.box_batch,
                "--device (type)": resolve_device(self.device).split(":")[0],  # CPU and CUDA kernels round differently
                # compiled kernels may fuse and round differently; absent when off, so that the
                # fingerprints of runs made before the option existed stay as they were
                **({"--compile": True} if self.compile else {}),
                **({"--cpu-bf16": True} if self.bf16_on_cpu else {})}

    def warnings(self) -> list[str]:
        """One-line warnings about these settings on this machine."""
        from ovsam_model.runtime import cpu_has_native_bf16

        if self.bf16_on_cpu and not cpu_has_native_bf16():
            return ["this CPU has no native bf16 (AVX512-BF16 or AMX): --cpu-bf16 will run slower than float32"]
        return []


def resolve_device(device: str) -> str:
    """"auto" → cuda when available, else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(settings: ModelSettings, vocabulary: Any = None) -> Any:
    """The predictor of `settings` with `vocabulary` (a `Vocabulary`, a vocabulary spec, or None
    for the model's default). A seam for tests, which cache the models they build."""
    from ovsam_model.builder import build_predictor

    return build_predictor(settings.model, vocab=vocabulary, names_file=settings.vocab_names,
                           device=resolve_device(settings.device), box_chunk=settings.box_batch, amp=settings.amp,
                           cpu_bf16=settings.cpu_bf16,
                           topk=settings.topk, roi_box=settings.roi_box, random_weights=settings.random_weights,
                           compile=settings.compile, **settings.weights)


def choose_vocabulary(vocab: Optional[str], label_source: str, images: ImageSource,
                      ann: Optional[PathLike]) -> tuple[Any, str]:
    """(the vocabulary to build with, where it comes from, for humans).

    `vocab` wins; else, with label source "ovsam" and a dataset's category list, the dataset's
    own categories (the built-in coco / lvis vocabulary when the list is exactly that), so that
    output ids mean what they mean in the dataset; else the model's default (None)."""
    if vocab is not None:
        return vocab, f"--vocab {vocab}"
    if label_source == "ovsam" and images.categories:
        from ovsam_model.vocab import vocabulary_from_categories

        return vocabulary_from_categories(images.categories, name=f"--ann {Path(ann or '').name}"), \
            f"the categories of --ann {ann}"
    return None, "the model's default"


def vocabulary_warnings(predictor: Any, vocab: Optional[str], images: ImageSource) -> list[str]:
    """A warning when a given vocabulary's ids mean other classes in the dataset."""
    if vocab is None or not images.categories:
        return []
    from ovsam_model.vocab import mismatched_categories

    bad = mismatched_categories(predictor, images.categories)
    if not bad:
        return []
    return [f"{len(bad)} of {len(predictor.category_ids)} --vocab classes have ids that --ann lacks or uses for other "
            f"classes (e.g. {', '.join(bad[:3])}); output category ids follow --vocab"]


def build_for_run(settings: ModelSettings, label_source: str, images: ImageSource, ann: Optional[PathLike], *,
                  load_as: Optional[ModelSettings] = None) -> tuple[Any, Any, str, list[str]]:
    """(predictor, vocabulary, where the vocabulary comes from, warnings) for a run: the
    vocabulary `choose_vocabulary` picks, the predictor of `load_as` (default `settings`) with it,
    and `vocabulary_warnings`."""
    vocabulary, origin = choose_vocabulary(settings.vocab, label_source, images, ann)
    predictor = load_predictor(load_as or settings, vocabulary)
    return predictor, vocabulary, origin, settings.warnings() + vocabulary_warnings(predictor, settings.vocab, images)


def check_inputs(images: Union[PathLike, ImageSource], source: PromptSource, *, ann: Optional[PathLike] = None,
                 exif: str = "auto", label_source: str = "ovsam", strict: bool = False) -> ImageSource:
    """Everything that can be checked without a model (no torch import): the images folder, the
    dataset JSON, the prompt file's structure, and that the dataset has the prompts' images.
    `images` may be an `ImageSource` already loaded (then `ann` only names it in messages)."""
    if isinstance(images, ImageSource):
        image_source = images
    else:
        image_source = load_image_source(images, ann, exif=exif)  # local paths, or URIs (ovsam_model.io.uris)
    mentioned = source.read(strict=strict, require_category=label_source == "detector")
    if ann is not None and mentioned and all(image_source.get(i) is None for i in mentioned):
        raise InputError(f"--ann {ann} has none of the images of the prompts (e.g. image_id {min(mentioned)})")
    return image_source


def check_out_not_input(out: PathLike, inputs: Mapping[str, Any]) -> None:
    """Refuse an `out` that is one of the run's input files ({option name: what was given}):
    the finished output would replace the detections or the dataset it was made from."""
    for name, given in inputs.items():
        if not isinstance(given, (str, Path)) or str(given) == "-":
            continue
        at = location(given)
        if isinstance(at, Path) and at.is_file() and Path(out).is_file() and os.path.samefile(at, out):
            raise InputError(f"{out} is the {name} input file: the output would overwrite it; "
                             f"write the output elsewhere")


def open_labeler(
    images: Union[PathLike, ImageSource],
    *,
    boxes: Any = None,
    points: Any = None,
    everything: Any = None,
    source: Optional[PromptSource] = None,
    ann: Optional[PathLike] = None,
    predictor: Any = None,
    model: Union[str, ModelSettings] = "ovsam-rn50x16-lvis",
    score_thr: float = 0.0,
    max_dets: int = 300,
    label_source: str = "ovsam",
    batch_size: int = 2,
    workers: int = 2,
    exif: str = "auto",
    strict: bool = False,
    events: Optional[LabelEvents] = None,
    ray: Any = None,
    **model_options: Any,
) -> Labeler:
    """A ready `Labeler`: prompts from `boxes` (a detector file, '-', or a list of dicts
    {image_id, bbox XYWH, score[, category_id]}), `points` (click records), `everything` (True,
    or an `ovsam_model.everything.EverythingSettings` or a dict of its fields: every image of the
    run is segmented from a grid of clicks, each mask named), or any `source`;
    images from the folder `images`, named and sized by the COCO/LVIS dataset `ann` (without it:
    `{image_id:012d}.jpg`), or an `ImageSource` already loaded. `images`, `ann` and the files of
    `boxes`/`points` are local paths or URIs that fsspec reads (`s3://bucket/val2017`: see
    `ovsam_model.io.uris`); outputs are local. `exif` ("auto", "apply",
    "ignore") chooses each image's frame. The model is `predictor` (ready), or built from `model` (a registry
    name, with `model_options` such as vocab=, device=, topk=, box_batch=, random_weights=,
    weights={...}; or a `ModelSettings`). Nothing is labeled yet: call `.run(out)` or iterate
    `.entries()`. `ray` (True, an address such as "auto" or "ray://head:10001", or a
    `ray_runner.RaySettings`): `.run(out)` labels on Ray Data actors (`ray_runner.RayLabeler`)."""
    given = {k: v for k, v in (("boxes", boxes), ("points", points), ("everything", everything))
             if v is not None and v is not False}
    if (source is None) == (not given) or len(given) > 1:
        raise InputError("give exactly one of boxes=, points=, everything= or source=")
    if source is None:
        option, value = next(iter(given.items()))
        settings_of_records = {"score_thr": score_thr, "max_dets": max_dets} if option != "everything" else {}
        source = make_source(option, value, **settings_of_records)
    image_source = check_inputs(images, source, ann=ann, exif=exif, label_source=label_source, strict=strict)
    settings = model if isinstance(model, ModelSettings) else ModelSettings(model=model, **model_options)
    if ray is not None and ray is not False:
        from .ray_runner import open_ray_labeler

        return open_ray_labeler(ray, image_source, source, settings, predictor=predictor, ann=ann,
                                label_source=label_source, batch_size=batch_size, strict=strict, events=events)
    origin, warnings, options = "the predictor's", [], {}
    if predictor is None:
        predictor, _, origin, warnings = build_for_run(settings, label_source, image_source, ann)
        options = settings.options()
    labeler = Labeler(predictor, image_source, source, label_source=label_source, batch_size=batch_size,
                      workers=workers, strict=strict, options=options, events=events)
    labeler.vocabulary_origin = origin
    labeler.warnings = warnings
    return labeler


def label_images(
    images: PathLike,
    *,
    out: Optional[PathLike] = None,
    fmt: Union[str, OutputFormat] = "results",
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    **labeler_options: Any,
) -> LabelSummary:
    """Label every image with prompts and write `out` (None: standard output) in `fmt`
    ("results": a COCO results array; "dataset": a COCO dataset JSON; or an `OutputFormat`,
    e.g. `get_format("results", segmentation="polygons")`). Returns the run's summary.
    `labeler_options` are those of `open_labeler` (`ray=True` labels on a local Ray instance,
    `ray="auto"` on the cluster of this machine: the same bytes)."""
    sink = get_format(fmt) if isinstance(fmt, str) else fmt
    if out is not None:  # every check of the output before the model is built
        out = local_output(out)  # a URI is refused in one line: outputs are local files
        check_out_not_input(out, {"boxes=": labeler_options.get("boxes"), "points=": labeler_options.get("points"),
                                  "ann=": labeler_options.get("ann")})
        check_out_target(out, sink)
        check_not_running(out, rank, world)
    labeler = open_labeler(images, **labeler_options)
    return labeler.run(out, sink, resume=resume, rank=rank, world=world)
