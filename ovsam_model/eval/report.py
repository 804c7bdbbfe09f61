"""Evaluation results (dataclasses), their JSON form and table rows, and JSON file I/O.

Units: every AP, AR, IoU and accuracy is a fraction in [0, 1] (as pycocotools reports them);
tables show them ×100, as the paper does. `None` (JSON `null`) means "undefined" (no
instance of that group); -1 is kept where pycocotools/LVIS return -1 (no ground truth in
that area range or frequency group).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ovsam_model.atomic import write_json_atomic as _write_json_atomic

DETECTOR_COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DETECTOR_OV_KEYS = ("AP_base", "AP_novel")
DETECTOR_LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass
class DetectorResult:
    """Detector protocol (paper Tab. 2-4): AP numbers of one prediction file.

    metrics: ordered name → value (fractions; -1 where the evaluator says undefined).
    notes: plain-language statements about what the numbers cover (e.g. the 65-class AP).
    """

    dataset: str
    iou_type: str
    split: str
    metrics: dict[str, float]
    num_images: int
    num_predictions: int
    num_categories: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProposalResult:
    """Proposals protocol (the SAM paper's zero-shot object proposals): class-agnostic recall.

    metrics: ordered name → value, e.g. "AR@100", "AR@1000", "ARs@1000" (fractions averaged over
    IoU 0.50:0.95; -1 where there is no ground truth of that size).
    max_dets: proposals kept per image for each AR@N. num_instances: non-crowd GT instances.
    """

    iou_type: str
    metrics: dict[str, float]
    max_dets: list[int]
    num_images: int
    num_predictions: int
    num_instances: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptResult:
    """Prompt protocol (paper Tab. 1) for one model.

    miou*: mean mask IoU over instances; acc*: top-1 accuracy (fractions).
    *_base / *_novel are None when the group has no instance.
    """

    model: str
    dataset: str
    prompt: str
    num_images: int
    num_instances: int
    num_base: int
    num_novel: int
    miou: Optional[float]
    miou_base: Optional[float]
    miou_novel: Optional[float]
    acc: Optional[float]
    acc_base: Optional[float]
    acc_novel: Optional[float]
    num_skipped_crowd: int = 0
    num_skipped_empty: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pct(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value < 0:  # the evaluators' "undefined"
        return "n/a"
    return f"{100.0 * value:.1f}"


def _metrics_table(metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "value (%)"]
    rows = [[name, _pct(value)] for name, value in metrics.items()]
    return header, rows


def detector_table(result: DetectorResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one detector result, values in percent."""
    return _metrics_table(result.metrics)


def proposal_table(result: ProposalResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one proposals result, values in percent."""
    return _metrics_table(result.metrics)


PROMPT_COLUMNS = (
    ("mIoU", "miou"), ("IoU_b", "miou_base"), ("IoU_n", "miou_novel"),
    ("Acc", "acc"), ("Acc_b", "acc_base"), ("Acc_n", "acc_novel"),
)


def prompt_table(results: Sequence[PromptResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per model, values in percent, then instance counts (all / base / novel)."""
    header = ["model"] + [name for name, _ in PROMPT_COLUMNS] + ["N", "N_b", "N_n"]
    rows = []
    for r in results:
        rows.append(
            [r.model]
            + [_pct(getattr(r, attr)) for _, attr in PROMPT_COLUMNS]
            + [str(r.num_instances), str(r.num_base), str(r.num_novel)]
        )
    return header, rows


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """json.load with errors that name the file (FileNotFoundError / ValueError)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        with p.open("r", encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not an error
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {p} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8 text: {e}") from None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """The report as indented JSON, written atomically."""
    _write_json_atomic(path, data, indent=2)
