"""metrics.jsonl: the one reader (`read_metrics_lines`) and the log's resume rule (`MetricsLog`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovsam_model.train.plot import PlotError, read_metrics
from ovsam_model.train.run_log import METRICS, MetricsLog, read_metrics_lines


def _log(folder: Path, lines: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / METRICS
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_resume_keeps_steps_up_to_k_once_each_and_appends(tmp_path):
    _log(tmp_path, [{"step": 0, "eval": {"iou": 0.1}}, {"step": 1, "loss": 2.0}, {"step": 1, "eval": {"iou": 0.2}},
                    {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}, '{"step": 4, "lo'])
    log = MetricsLog(tmp_path, resume_step=2)
    log.write({"step": 3, "loss": 0.9})
    log.close()
    records = read_metrics_lines(tmp_path / METRICS)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[1] == {"step": 1, "loss": 2.0, "eval": {"iou": 0.2}}  # a repeated step's records merged
    assert records[3]["loss"] == 0.9  # the old step 3 is gone, the new one appended


def test_a_new_run_replaces_an_old_log_and_a_disabled_log_writes_nothing(tmp_path):
    _log(tmp_path, [{"step": 5, "loss": 1.0}])
    MetricsLog(tmp_path / "other", enabled=False).write({"step": 1})
    assert not (tmp_path / "other" / METRICS).exists()
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": float("nan")})
    log.close()
    assert read_metrics_lines(tmp_path / METRICS) == [{"step": 1, "loss": None}]


@pytest.mark.parametrize("bad, reason", [('{"step": 3, "loss": ', "malformed line 2: "),
                                         ("[1, 2]", "malformed line 2: not a JSON object"),
                                         ('{"step": true}', "malformed line 2: no numeric 'step'"),
                                         ('{"step": 2, "eval": 3}', "malformed line 2: 'eval' is not an object")])
def test_resume_and_plot_read_a_log_the_same_way(tmp_path, bad, reason):
    """A bad line before the last stops both readers with the same message; a cut last line
    (after blank lines too) is dropped by both."""
    path = _log(tmp_path / "run", [{"step": 1, "loss": 1.0}, bad, {"step": 3, "loss": 0.5}])
    with pytest.raises(ValueError) as direct:
        read_metrics_lines(path)
    with pytest.raises(PlotError) as plotted:
        read_metrics(tmp_path / "run")
    assert str(direct.value) == str(plotted.value) and reason in str(direct.value) and str(path) in str(direct.value)
    with pytest.raises(ValueError):
        MetricsLog(tmp_path / "run", resume_step=3)
    cut = _log(tmp_path / "cut", [{"step": 1, "loss": 1.0}, bad, "", ""])
    if reason.endswith(": "):  # only an unparsable line is a crash's cut line
        assert read_metrics_lines(cut) == read_metrics(tmp_path / "cut") == [{"step": 1, "loss": 1.0}]
