"""Training curves from the metrics logs of `ovsam distill` and `ovsam finetune`.

A run folder holds `metrics.jsonl`: one JSON object per line, appended during training, each with
`step` (iterations done) and `epoch`; training lines add `loss`, its terms (distill: `mse`;
finetune: `ce`, `bce`, `dice`), `lr`, `grad_norm` and `images_per_s`; evaluation lines add `eval`,
a dict name → number or null. `config.json`, when present, names the `model`.

No key set is assumed: every numeric key is drawn. `lr*` keys share the learning-rate panel; keys
that read as a norm, a rate, a time or a memory size (`grad_norm`, `images_per_s`, `data_s`, ...)
get a panel each; every other numeric key is a loss term, drawn with `loss`. Eval keys are drawn
one panel per family, the name before the first `_` (`iou`, `iou_base`, `iou_novel` → `iou`).

A step logged twice (a resumed run redoes the iterations after its last checkpoint) keeps the
later value. Reading needs no matplotlib; drawing imports it (the Agg canvas, no pyplot state).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovsam_model.atomic import atomic_path
from ovsam_model.train.run_log import read_metrics_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
DEFAULT_OUTPUT = "curves.png"
IMAGE_FORMATS = (".png", ".pdf", ".svg")  # what `plot_runs` writes (the output's suffix)

LOSS_PANEL = "loss"
LR_PANEL = "lr"
EVAL_PREFIX = "eval: "

_NOT_SERIES = ("step", "epoch", "eval")
# a top-level key that is not a loss term: a norm, a rate, a time, a memory size, a scale, a count
_OWN_PANEL = re.compile(r"(norm|_s|per_s|sec|seconds|time|mem|memory|gb|gib|mb|mib|scale|count)$")


class PlotError(ValueError):
    """A run folder or metrics log that cannot be drawn; the message is one line."""


def check_run_dir(run_dir: Path) -> Path:
    """The metrics log of `run_dir`; `PlotError` when the folder or its log is missing."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise PlotError(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: not a folder")
    log = run_dir / METRICS_FILE
    if not log.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (written by ovsam distill and ovsam finetune)")
    return log


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`, in file order (`run_log.read_metrics_lines`).

    `PlotError` on a missing folder or log, a log without records, and a malformed line (the
    message names the file and line)."""
    log = check_run_dir(run_dir)
    try:
        records = read_metrics_lines(log)
    except ValueError as e:
        raise PlotError(str(e)) from None
    if not records:
        raise PlotError(f"{log}: empty log")
    return records


def read_config(run_dir: Path) -> dict:
    """`run_dir/config.json` as a dict; {} when it is absent or unreadable (it only labels the run)."""
    try:
        config = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunCurves:
    """One run's curves: panel → series name → {step: value} (None / null values are NaN)."""

    label: str
    panels: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)

    def add(self, panel: str, name: str, step: float, value: Any) -> None:
        if value is None or _is_number(value):
            series = self.panels.setdefault(panel, {}).setdefault(name, {})
            series[step] = math.nan if value is None else float(value)


def panel_of(key: str) -> str:
    """The panel of a top-level numeric key of a training line (see the module docstring)."""
    if key == "lr" or key.startswith("lr_"):
        return LR_PANEL
    if _OWN_PANEL.search(key):
        return key
    return LOSS_PANEL


def eval_panel_of(key: str) -> str:
    """The panel of an eval key: its family, the name before the first `_`."""
    return EVAL_PREFIX + key.split("_", 1)[0]


def run_curves(records: Sequence[dict], label: str) -> RunCurves:
    """The records of one log (`read_metrics`) as curves; a later line wins for a repeated step."""
    run = RunCurves(label)
    for record in records:
        step = record["step"]
        for key, value in record.items():
            if key not in _NOT_SERIES:
                run.add(panel_of(key), key, step, value)
        for key, value in (record.get("eval") or {}).items():
            run.add(eval_panel_of(key), key, step, value)
    return run


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Legend labels: each run folder's name (its path where two names are equal), with the
    model of its config.json when there is one."""
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    labels = []
    for run_dir, name in zip(run_dirs, names):
        if names.count(name) > 1:
            name = str(run_dir)
        model = read_config(run_dir).get("model")
        labels.append(f"{name} ({model})" if isinstance(model, str) and model else name)
    return labels


def _panel_order(runs: Sequence[RunCurves]) -> list[str]:
    """loss, lr, the other training panels, then the eval families, each in order of first appearance."""
    seen: dict[str, None] = {}
    for run in runs:
        seen.update(dict.fromkeys(run.panels))
    train = [p for p in seen if not p.startswith(EVAL_PREFIX)]
    first = [p for p in (LOSS_PANEL, LR_PANEL) if p in seen]
    return first + [p for p in train if p not in first] + [p for p in seen if p.startswith(EVAL_PREFIX)]


def _series_order(runs: Sequence[RunCurves], panel: str) -> list[str]:
    names: dict[str, None] = {}
    if panel == LOSS_PANEL and any("loss" in run.panels.get(panel, {}) for run in runs):
        names["loss"] = None  # the total first
    for run in runs:
        names.update(dict.fromkeys(run.panels.get(panel, {})))
    return list(names)


# one per series of a panel when several runs share it (the colour is the run's): a distill run
# and a finetune run give five loss series (loss, mse, ce, bce, dice), so four would repeat one
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 4)), (0, (3, 1, 1, 1, 1, 1, 1, 1)))


def build_figure(run_dirs: Sequence[Path], title: str | None = None) -> "Figure":
    """The figure of `plot_runs`: one axes per panel (titled by the panel: `loss`, `lr`,
    `grad_norm`, `images_per_s`, `eval: iou`, ...), one line per (run, series) whose label is the
    series name and whose gid is the run's label. One run: a colour per series. Several runs: a
    colour per run and a line style per series. A figure legend names the runs; a panel with
    several series has a legend naming them. `PlotError` as `read_metrics`, or when no run has
    anything to draw."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise PlotError("no run folder given")
    logs = [read_metrics(d) for d in run_dirs]
    runs = [run_curves(records, label) for records, label in zip(logs, run_labels(run_dirs))]
    panels = _panel_order(runs)
    if not panels:
        raise PlotError(f"{', '.join(map(str, run_dirs))}: nothing to draw (no numeric value besides step and epoch)")

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colours = [f"C{i}" for i in range(10)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    several = len(runs) > 1
    for ax, panel in zip(axes, panels):
        names = _series_order(runs, panel)
        finite = []
        for r, run in enumerate(runs):
            for s, name in enumerate(names):
                points = run.panels.get(panel, {}).get(name)
                if not points:
                    continue
                steps = sorted(points)
                values = [points[step] for step in steps]
                finite += [v for v in values if math.isfinite(v)]
                colour = colours[(r if several else s) % len(colours)]
                style = _LINESTYLES[s % len(_LINESTYLES)] if several else "-"
                sparse = panel.startswith(EVAL_PREFIX) or len(steps) <= 20
                ax.plot(steps, values, color=colour, linestyle=style, marker="o" if sparse else None, markersize=3,
                        linewidth=1.2, label=name, gid=run.label)
        if panel == LOSS_PANEL and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if len(names) > 1:
            if several:
                handles = [Line2D([], [], color="0.3", linestyle=_LINESTYLES[s % len(_LINESTYLES)])
                           for s in range(len(names))]
            else:
                handles = [Line2D([], [], color=colours[s % len(colours)]) for s in range(len(names))]
            ax.legend(handles, names, fontsize="small")
    run_handles = [Line2D([], [], color=colours[r % len(colours)] if several else "0.2") for r in range(len(runs))]
    fig.legend(run_handles, [run.label for run in runs], loc="outside lower center",
               ncols=min(len(runs), 4), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(run_dirs: Sequence[Path], output: Path, title: str | None = None) -> Path:
    """Draw the training curves of `run_dirs` (see `build_figure`) into `output` (.png, .pdf or
    .svg, by its suffix; written atomically) and return `output`. `PlotError` on a run that cannot
    be read or an unknown image suffix."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise PlotError(f"{output}: unknown image format {output.suffix or '(no suffix)'} "
                        f"(use {', '.join(IMAGE_FORMATS)})")
    fig = build_figure(run_dirs, title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(output, suffix=suffix) as tmp:
        fig.savefig(tmp, format=suffix[1:])
    return output
