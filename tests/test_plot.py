"""`ovsam plot`: training curves from synthetic distill and finetune metrics logs.

The figure is checked as data (panels, lines, legends), the image as a PNG file, and the command
through the CLI: its output, its one-line errors and its help.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ovsam_cli.main import app
from ovsam_model.train.plot import PlotError, build_figure, plot_runs, read_metrics

REPO = Path(__file__).resolve().parents[1]
DISTILL_EVAL = ("mse", "mse_untrained", "mse_constant")
FINETUNE_EVAL = ("iou", "iou_base", "iou_novel", "acc", "acc_base", "acc_novel")


def _train_line(step: int, terms: tuple[str, ...]) -> dict:
    values = {term: (i + 1) * math.exp(-step / 40) + 0.01 for i, term in enumerate(terms)}
    return {"step": step, "epoch": step // 50, "loss": sum(values.values()), **values,
            "lr": 1e-4 * min(1.0, step / 10), "grad_norm": 1.0 + step % 7, "images_per_s": 30.0 + step % 3}


def _write_run(folder: Path, lines: list, config: dict | None = None, tail: str = "") -> Path:
    folder.mkdir(parents=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text + tail)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def distill_run(folder: Path, steps: int = 60) -> Path:
    """A distill log that starts with an eval-only step-0 line, evaluates every 20 iterations."""
    lines: list = [{"step": 0, "epoch": 0, "eval": {k: 0.5 for k in DISTILL_EVAL}}]
    for step in range(1, steps + 1):
        line = _train_line(step, ("mse",))
        if step % 20 == 0:
            line["eval"] = {k: 0.5 - step / 1000 + i / 10 for i, k in enumerate(DISTILL_EVAL)}
        lines.append(line)
    return _write_run(folder, lines, {"command": "distill", "model": "ovsam-rn50x16-coco"})


def finetune_run(folder: Path, steps: int = 60, novel: bool = True, config: bool = True) -> Path:
    """A finetune log whose last line was cut by a crash; with or without novel classes."""
    keys = FINETUNE_EVAL if novel else tuple(k for k in FINETUNE_EVAL if not k.endswith("_novel"))
    lines: list = []
    for step in range(1, steps + 1):
        line = _train_line(step, ("ce", "bce", "dice"))
        if step % 30 == 0:
            line["eval"] = {k: None if (k == "iou_novel" and step == 30) else 0.3 + step / 1000 for k in keys}
        lines.append(line)
    tail = json.dumps(_train_line(steps + 1, ("ce", "bce", "dice")))[:25]  # no newline: cut mid-write
    return _write_run(folder, lines, {"command": "finetune", "model": "ovsam-rn50x16-coco"} if config else None,
                      tail=tail)


def _panels(fig) -> dict[str, list]:
    """Each axes' title → its lines."""
    return {ax.get_title(): ax.get_lines() for ax in fig.axes}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.rstrip().endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


# --- reading ------------------------------------------------------------------------------------

def test_read_metrics_skips_a_cut_last_line_and_keeps_the_eval_only_line(tmp_path):
    records = read_metrics(finetune_run(tmp_path / "ft", steps=10))
    assert [r["step"] for r in records] == list(range(1, 11))
    records = read_metrics(distill_run(tmp_path / "d", steps=5))
    assert records[0] == {"step": 0, "epoch": 0, "eval": {k: 0.5 for k in DISTILL_EVAL}}


@pytest.mark.parametrize("bad, reason", [("{\"step\": 3, \"loss\": ", "malformed line 2: "),
                                         ("[1, 2]", "malformed line 2: not a JSON object"),
                                         ("{\"loss\": 1.0}", "malformed line 2: no numeric 'step'")])
def test_a_malformed_middle_line_is_an_error_naming_the_line(tmp_path, bad, reason):
    run = _write_run(tmp_path / "run", [{"step": 1, "loss": 1.0}, bad, {"step": 3, "loss": 0.5}])
    with pytest.raises(PlotError) as e:
        read_metrics(run)
    message = str(e.value)
    assert "\n" not in message and str(run / "metrics.jsonl") in message and reason in message


def test_missing_folder_log_and_empty_log(tmp_path):
    for folder, message in ((tmp_path / "missing", "no such folder"), (tmp_path, "no metrics.jsonl")):
        with pytest.raises(PlotError, match=message):
            read_metrics(folder)
    run = _write_run(tmp_path / "empty", [], tail="\n\n")
    with pytest.raises(PlotError, match="empty log"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')  # a single line, cut: nothing left
    with pytest.raises(PlotError, match="empty log"):
        read_metrics(run)


# --- the figure ---------------------------------------------------------------------------------

def test_distill_figure_panels_and_lines(tmp_path):
    fig = build_figure([distill_run(tmp_path / "sam2clip")])
    panels = _panels(fig)
    assert list(panels) == ["loss", "lr", "grad_norm", "images_per_s", "eval: mse"]
    assert [line.get_label() for line in panels["loss"]] == ["loss", "mse"]
    assert [line.get_label() for line in panels["eval: mse"]] == list(DISTILL_EVAL)
    assert all(len(panels[p]) == 1 for p in ("lr", "grad_norm", "images_per_s"))
    eval_steps = list(panels["eval: mse"][0].get_xdata())
    assert eval_steps == [0, 20, 40, 60]  # the step-0 eval-only line is drawn
    assert list(panels["loss"][0].get_xdata()) == list(range(1, 61))  # and has no loss point
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["loss", "mse"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sam2clip (ovsam-rn50x16-coco)"]
    assert len({line.get_color() for line in panels["eval: mse"]}) == 3  # one run: a colour per series


def test_finetune_figure_has_one_panel_per_eval_family_and_nulls_as_gaps(tmp_path):
    fig = build_figure([finetune_run(tmp_path / "clip2sam", config=False)], title="finetune")
    panels = _panels(fig)
    assert list(panels) == ["loss", "lr", "grad_norm", "images_per_s", "eval: iou", "eval: acc"]
    assert [line.get_label() for line in panels["loss"]] == ["loss", "ce", "bce", "dice"]
    assert [line.get_label() for line in panels["eval: iou"]] == ["iou", "iou_base", "iou_novel"]
    assert [line.get_label() for line in panels["eval: acc"]] == ["acc", "acc_base", "acc_novel"]
    novel = panels["eval: iou"][2].get_ydata()
    assert math.isnan(novel[0]) and novel[1] == pytest.approx(0.36)
    assert fig.get_suptitle() == "finetune"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["clip2sam"]  # no config.json: no model


def test_loss_is_linear_when_a_value_is_not_positive(tmp_path):
    run = _write_run(tmp_path / "run", [{"step": 1, "loss": 0.5, "odd_term": -0.1}, {"step": 2, "loss": 0.4}])
    fig = build_figure([run])
    assert list(_panels(fig)) == ["loss"]  # an unknown key is a loss term; no lr, no eval
    assert fig.axes[0].get_yscale() == "linear"
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss", "odd_term"]


def test_a_resumed_run_keeps_the_later_value_of_a_repeated_step(tmp_path):
    run = _write_run(tmp_path / "run", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.0},
                                        {"step": 3, "loss": 0.5}])
    line = build_figure([run]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [3.0, 1.0, 0.5]


def test_two_runs_share_panels_with_a_colour_each(tmp_path):
    a = finetune_run(tmp_path / "a" / "coco")
    b = finetune_run(tmp_path / "b" / "coco", novel=False)
    fig = build_figure([a, b])
    panels = _panels(fig)
    assert list(panels) == ["loss", "lr", "grad_norm", "images_per_s", "eval: iou", "eval: acc"]
    assert len(panels["loss"]) == 8 and len(panels["lr"]) == 2
    assert [line.get_label() for line in panels["eval: iou"]] == ["iou", "iou_base", "iou_novel", "iou", "iou_base"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{a} (ovsam-rn50x16-coco)", f"{b} (ovsam-rn50x16-coco)"]  # equal names: the paths
    by_run = {}
    for line in panels["loss"]:
        by_run.setdefault(line.get_gid(), set()).add(line.get_color())
    assert len(by_run) == 2 and all(len(c) == 1 for c in by_run.values())
    assert len({c for colours in by_run.values() for c in colours}) == 2
    assert len({line.get_linestyle() for line in panels["loss"]}) == 4  # a line style per loss term


# --- the image ----------------------------------------------------------------------------------

def test_plot_runs_writes_a_png_atomically(tmp_path):
    run = distill_run(tmp_path / "sam2clip")
    out = plot_runs([run], run / "curves.png")
    assert out == run / "curves.png"
    width, height = _png_size(out)
    assert 600 <= width <= 3000 and 400 <= height <= 3000 and out.stat().st_size > 20_000
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "metrics.jsonl"]  # no temp file
    with pytest.raises(PlotError, match="unknown image format"):
        plot_runs([run], run / "curves.jpg")


# --- the command --------------------------------------------------------------------------------

def _ovsam(*args) -> object:
    return CliRunner().invoke(app, ["plot", *map(str, args)])


def test_cli_writes_the_default_output_and_prints_its_path(tmp_path):
    a, b = distill_run(tmp_path / "a"), finetune_run(tmp_path / "b")
    result = _ovsam(a, b, "--title", "two runs")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(a / "curves.png")
    _png_size(a / "curves.png")
    assert not (b / "curves.png").exists()


def test_cli_errors_are_one_line(tmp_path):
    run = _write_run(tmp_path / "run", [{"step": 1, "loss": 1.0}, "{oops", {"step": 3, "loss": 0.5}])
    good = finetune_run(tmp_path / "good", steps=3)
    cases = [((good, run), "metrics.jsonl: malformed line 2"),
             ((tmp_path / "missing",), "missing: no such folder"),
             ((good, "--out", tmp_path / "nope" / "x.png"), "does not exist"),
             ((good, "--out", tmp_path / "x.jpg"), "unknown image format .jpg")]
    for args, message in cases:
        result = _ovsam(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code != 0 and result.stdout == "", (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    assert not (good / "curves.png").exists()


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(app, ["plot", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("RUN", "--out", "FIRST_RUN/curves.png", "--title", "metrics.jsonl"):
        assert word in result.stdout, word


def test_a_missing_folder_is_reported_without_importing_matplotlib_or_torch(tmp_path):
    code = ("import sys; from ovsam_cli.main import run; sys.argv = ['ovsam', 'plot', sys.argv[1]]\n"
            "try: run()\n"
            "finally: print('HEAVY:' + ','.join(m for m in ('matplotlib', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "no such folder" in proc.stderr
    assert proc.stdout.strip() == "HEAVY:"
