"""`ovsam eval`: the paper's two evaluation protocols (spec §7) on COCO and LVIS, and proposal recall.

Detector protocol: AP of a COCO results file (`ovsam label` output) with COCOeval / LVISEval.
Prompt protocol: one box or centre-point prompt per GT instance, mIoU and top-1 accuracy, for one
or several models side by side.
Proposals protocol: class-agnostic AR of a COCO results file (COCOeval with useCats=0, the SAM
paper's zero-shot object proposals). The work is done by `ovsam_model.eval`; this module parses
options, builds predictors, prints the table and writes the JSON report.

Register with `app.command("eval")(eval_command)`.
"""

from __future__ import annotations

import gc
import logging
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

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
    exit_broken_pipe,
    fail,
    info,
    out_console,
    resolve_device,
    user_errors,
    weight_options,
)
from ovsam_model import __version__
from ovsam_model.weights import sha256_of

if TYPE_CHECKING:  # the evaluators import torch: only inside the command, after its checks
    from ovsam_model.eval.report import DetectorResult, PromptResult, ProposalResult


class Protocol(str, Enum):
    detector = "detector"
    prompt = "prompt"
    proposals = "proposals"


class DatasetName(str, Enum):
    coco = "coco"
    lvis = "lvis"


class SplitName(str, Enum):
    ov = "ov"
    all = "all"


class IouTypeName(str, Enum):
    segm = "segm"
    bbox = "bbox"


class PromptName(str, Enum):
    box = "box"
    point = "point"




def _render(header: list[str], rows: list[list[str]], title: str, notes: list[str], to_stdout: bool) -> None:
    """The results table, then its notes (what the numbers cover) one per line."""
    out = out_console if to_stdout else err_console
    # The first column (model names) never truncates: as wide as its longest entry when the
    # terminal leaves room next to the number columns, else folded over several lines.
    widths = [max([cell_len(h)] + [cell_len(str(r[i])) for r in rows]) for i, h in enumerate(header)]
    room = out.width - sum(w + 3 for w in widths[1:]) - 4  # 3 = padding + border per column
    first_width = max(cell_len(header[0]), min(widths[0], room))
    # at least as wide as the title, so that it stays on one line when the terminal allows
    table = Table(title=title, title_justify="left", min_width=min(cell_len(title) + 2, out.width))
    for i, name in enumerate(header):
        if i == 0:
            table.add_column(name, justify="left", overflow="fold", no_wrap=False, min_width=first_width)
        else:
            table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for note in notes:
        out.print(f"[dim]- {escape(note)}[/dim]", soft_wrap=True)


def _run_detector(ann: Path, pred: Path, dataset: str, split: str, iou_type: str) -> tuple[DetectorResult, dict]:
    from ovsam_model.eval.detector import evaluate_detections

    result = evaluate_detections(ann, pred, dataset=dataset, iou_type=iou_type, split=split)  # type: ignore[arg-type]
    report = {
        "ovsam_version": __version__,
        "protocol": "detector",
        "settings": {"dataset": dataset, "split": split, "iou_type": iou_type, "ann": str(ann),
                     "ann_sha256": sha256_of(ann), "pred": str(pred), "pred_sha256": sha256_of(pred)},
        "result": result.to_json(),
    }
    return result, report


def _run_proposals(ann: Path, pred: Path, iou_type: str) -> tuple[ProposalResult, dict]:
    from ovsam_model.eval.proposals import evaluate_proposals

    result = evaluate_proposals(ann, pred, iou_type=iou_type)  # type: ignore[arg-type]
    report = {
        "ovsam_version": __version__,
        "protocol": "proposals",
        "settings": {"iou_type": iou_type, "max_dets": result.max_dets, "ann": str(ann),
                     "ann_sha256": sha256_of(ann), "pred": str(pred), "pred_sha256": sha256_of(pred)},
        "result": result.to_json(),
    }
    return result, report


def _run_prompt(
    ann: Path, images: Path, models: list[str], dataset: str, prompt: str, *, vocab: Optional[str],
    vocab_names: Optional[Path], roi_box: str,
    batch_size: int, max_images: Optional[int], device: str, build_kwargs: dict[str, Any], progress: bool,
    workers: int = 0,
) -> tuple[list[PromptResult], dict]:
    from ovsam_model.builder import build_predictor
    from ovsam_model.eval.detector import load_ground_truth
    from ovsam_model.eval.prompt import PUBLISHED_MASK_POSTPROCESS, evaluate_prompts
    from ovsam_model.vocab import vocabulary_from_categories

    gt = load_ground_truth(ann)  # read once, shared by all models
    categories = list(gt["categories"])
    if vocab is None and not categories:
        raise CliError(f"{ann} has no categories; give --vocab")
    info(f"vocabulary: {f'--vocab {vocab}' if vocab is not None else f'the {len(categories)} categories of --ann {ann}'}",
         quiet=not progress)
    results, entries = [], []
    for name in models:
        info(f"building {name} on {device}", quiet=not progress)
        # The GT's own categories unless --vocab: accuracy compares ids that mean the same classes.
        # A fresh Vocabulary per model (a builder may attach a model's own embeddings to it).
        vocabulary = vocab if vocab is not None else vocabulary_from_categories(categories, name=f"--ann {ann.name}")
        predictor = build_predictor(name, vocab=vocabulary, names_file=vocab_names, device=device, progress=progress,
                                    mask_postprocess=PUBLISHED_MASK_POSTPROCESS, roi_box=roi_box, **build_kwargs)
        result = evaluate_prompts(predictor, gt, images, prompt=prompt, dataset=dataset,  # type: ignore[arg-type]
                                  batch_size=batch_size, max_images=max_images, progress=progress,
                                  model_name=name, workers=workers)
        results.append(result)
        entries.append({"name": name, "weights_sha256": dict(predictor.weights_sha256),
                        "result": result.to_json()})
        del predictor  # one model in memory at a time
        gc.collect()
    report = {
        "ovsam_version": __version__,
        "protocol": "prompt",
        "settings": {"dataset": dataset, "prompt": prompt, "ann": str(ann), "ann_sha256": sha256_of(ann),
                     "images": str(images), "vocab": vocab if vocab is not None else "ann categories",
                     "vocab_names": str(vocab_names) if vocab_names else None,
                     "mask_postprocess": PUBLISHED_MASK_POSTPROCESS, "roi_box": roi_box,
                     "batch_size": batch_size, "max_images": max_images,
                     "device": device, "random_weights": bool(build_kwargs.get("random_weights"))},
        "models": entries,
    }
    return results, report


def eval_command(
    ann: Annotated[Path, typer.Option("--ann", help="Ground truth: COCO or LVIS dataset JSON.")],
    protocol: Annotated[Protocol, typer.Option(help="detector: AP of --pred; prompt: mIoU/Acc of --model; proposals: class-agnostic recall (AR) of --pred.")] = Protocol.detector,
    dataset: Annotated[DatasetName, typer.Option(help="Evaluator and base/novel split: coco (48/17) or lvis (f+c / r).")] = DatasetName.coco,
    pred: Annotated[Optional[Path], typer.Option("--pred", help="Detector and proposals protocols: COCO results JSON (e.g. `ovsam label` output).")] = None,
    split: Annotated[SplitName, typer.Option(help="Detector protocol, COCO: 'ov' adds AP_base/AP_novel and restricts AP to the 65 OV classes.")] = SplitName.all,
    iou_type: Annotated[IouTypeName, typer.Option("--iou-type", help="Detector and proposals protocols: mask (segm) or box AP / AR.")] = IouTypeName.segm,
    prompt: Annotated[PromptName, typer.Option(help="Prompt protocol: GT box or centre point per instance.")] = PromptName.box,
    images: Annotated[Optional[Path], typer.Option(help="Prompt protocol: folder of the GT images.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Prompt protocol: model name(s), comma-separated, evaluated side by side.")] = None,
    vocab: VocabOpt = None,
    vocab_names: VocabNamesOpt = None,
    roi_box: RoiBoxOpt = RoiBox.mask,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompt protocol: images per model call.")] = 1,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=1, help="Prompt protocol: evaluate only the first N images (sorted by id).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Prompt protocol: DataLoader processes reading the images and ground-truth masks (0: in this process).")] = 2,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    checkpoint: CheckpointOpt = None,
    clip_weights: ClipWeightsOpt = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Random weights (smoke tests; numbers are meaningless).")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write every number and the settings as JSON to FILE, or '-' for stdout.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate with the paper's protocols: detector AP (Tab. 2-4) or prompt mIoU and accuracy (Tab. 1); or proposal recall.

    Detector protocol: the AP of a COCO results file (--pred, e.g. `ovsam label` output) against --ann, with COCOeval or LVISEval.

    Prompt protocol: each model in --model gets one GT box or centre point per instance of --ann; reports mask IoU and top-1 label accuracy, base and novel classes apart. The vocabulary is the categories of --ann unless --vocab is given, so that accuracy compares ids that mean the same classes; masks use SAM's own (exact) post-processing, as the published numbers.

    Proposals protocol: the class-agnostic recall of a COCO results file (--pred, e.g. `ovsam label` output) against --ann (COCO or LVIS JSON), with COCOeval and useCats=0, as the SAM paper's zero-shot object proposals: categories are ignored, AR@1/10/100/1000 keep the top N results per image by score, ARs/ARm/ARl are at 1000. --dataset is not used; --split ov is refused.

    The table goes to stdout (to stderr with --json -); --json writes every number and the settings.
    """
    from ovsam_model.registry import UnknownModelError

    logging.getLogger("lvis").setLevel(logging.ERROR)  # lvis warns on every list input
    table_on_stdout = json_out != "-"
    with user_errors(also=(ValueError,)):  # the cheap checks, before torch is imported
        if not ann.is_file():
            raise CliError(f"ground-truth file not found: {ann}")
        if json_out not in (None, "-") and Path(json_out).is_dir():  # found now, not after the evaluation
            raise CliError(f"--json {json_out} is a folder; give a file name (or '-' for stdout)")
        names = [m.strip() for m in (model or "").split(",") if m.strip()]
        if protocol in (Protocol.detector, Protocol.proposals):
            if pred is None:
                raise CliError(f"the {protocol.value} protocol needs --pred (a COCO results JSON, e.g. `ovsam label` output)")
            if not pred.is_file():
                raise CliError(f"prediction file not found: {pred}")
            if protocol is Protocol.proposals and split is SplitName.ov:
                raise CliError("--split ov does not apply to the proposals protocol (it is class-agnostic)")
        else:
            if images is None or not names:
                raise CliError("the prompt protocol needs --images DIR and --model NAME[,NAME...]")
            if not images.is_dir():
                raise CliError(f"images folder not found: {images}")
            build_kwargs = {"random_weights": random_weights,
                            **weight_options(cache_dir, offline, checkpoint, clip_weights)}

    from ovsam_model.eval.report import detector_table, prompt_table, proposal_table, write_json_atomic

    with user_errors(also=(ValueError,)):
        try:
            if protocol is Protocol.detector:
                det, report = _run_detector(ann, pred, dataset.value, split.value, iou_type.value)
                header, rows = detector_table(det)
                title = f"{dataset.value} {iou_type.value} AP (split {split.value})"
                notes = det.notes
            elif protocol is Protocol.proposals:
                prop, report = _run_proposals(ann, pred, iou_type.value)
                header, rows = proposal_table(prop)
                title = f"class-agnostic {iou_type.value} proposal recall"
                notes = prop.notes
            else:
                results, report = _run_prompt(ann, images, names, dataset.value, prompt.value, vocab=vocab,
                                              vocab_names=vocab_names, roi_box=roi_box.value,
                                              batch_size=batch_size, max_images=max_images,
                                              device=resolve_device(device), build_kwargs=build_kwargs,
                                              progress=not quiet, workers=workers)
                header, rows = prompt_table(results)
                title = f"{dataset.value} {prompt.value}-prompt protocol (%)"
                notes = results[0].notes if results else []
        except KeyError as e:  # a record without a field the evaluators need
            if isinstance(e, UnknownModelError):
                raise
            raise CliError(f"malformed input: missing field {e}") from None

    try:
        if json_out == "-":
            import json

            typer.echo(json.dumps(report, indent=2))
        elif json_out:
            try:
                write_json_atomic(json_out, report)
            except OSError as e:
                fail(f"cannot write {json_out}: {e}")
            info(f"wrote {json_out}", quiet)
        if table_on_stdout or not quiet:
            _render(header, rows, title, notes, to_stdout=table_on_stdout)
    except BrokenPipeError:  # `ovsam eval ... | head`: the reader has what it wanted
        exit_broken_pipe()
