"""User mistakes in `ovsam eval`, `ovsam convert` and `ovsam show` found by an audit: each is one
line on stderr (never a traceback), found before any work, and a hand-edited review link does
not break the page's script."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import typer
from typer.testing import CliRunner

from ovsam_cli.convert import convert
from ovsam_cli.eval import eval_command
from ovsam_cli.show import show

from test_cli_eval import GT, SAMPLE, pytestmark  # noqa: E402,F401  (the sample data; skip without it)

app = typer.Typer(no_args_is_help=True)
app.command("eval")(eval_command)
app.command("convert")(convert)
app.command("show")(show)
runner = CliRunner()


def _records(kind: str = "segm") -> list[dict]:
    preds = json.loads((SAMPLE / f"instances_val2014_fake{kind}100_results.json").read_text())
    return [p for p in preds if p["image_id"] in (139, 802)]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("field, value, says", [
    ("segmentation", "abc", "#3: 'segmentation'"),
    ("segmentation", [[1, 2, 3]], "#3: 'segmentation'"),
    ("segmentation", [[1, 2, 3, 4, 5, "a"]], "#3: 'segmentation'"),
    ("image_id", [139], "#3: 'image_id'"),
    ("category_id", "cat", "#3: 'category_id'"),
    ("score", "high", "#3: 'score'"),
    ("score", float("nan"), "#3: 'score'"),
])
def test_eval_malformed_record_is_one_line_naming_it(tmp_path, field, value, says):
    preds = _records()
    preds[3][field] = value
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(preds))
    line = _one_line_error(runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(path)]))
    assert says in line


def test_eval_names_the_first_records_in_numeric_order(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(_records("bbox")))
    line = _one_line_error(runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(path)]))
    assert "missing in #0, 1, 2, 3, 4 (and 14 more)" in line


def test_eval_of_a_dataset_json_as_predictions_says_what_it_is():
    # the ground truth given as --pred: its annotations have no scores
    line = _one_line_error(runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(GT)]))
    assert "lacks score (a dataset JSON" in line


def test_eval_lvis_ground_truth_with_dataset_coco_says_use_lvis(tmp_path):
    lvis = json.loads(GT.read_text())
    for cat in lvis["categories"]:
        cat["frequency"] = "f"
    for ann in lvis["annotations"]:
        del ann["iscrowd"]
    ann_path, pred_path = tmp_path / "lvis.json", tmp_path / "pred.json"
    ann_path.write_text(json.dumps(lvis))
    pred_path.write_text(json.dumps(_records()))
    line = _one_line_error(runner.invoke(app, ["eval", "--ann", str(ann_path), "--pred", str(pred_path)]))
    assert "iscrowd" in line and "--dataset lvis" in line


def test_eval_json_onto_a_folder_is_refused_before_evaluating(tmp_path, monkeypatch):
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(_records()))
    import ovsam_cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "_run_detector", lambda *a: pytest.fail("evaluated before checking --json"))
    line = _one_line_error(runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(pred_path),
                                               "--json", str(tmp_path)]))
    assert f"--json {tmp_path}" in line and ".tmp" not in line


@pytest.mark.parametrize("fmt", ["results", "dataset", "labelstudio"])
def test_convert_json_format_onto_a_folder_names_out(tmp_path, fmt):
    if fmt == "labelstudio":
        pytest.importorskip("label_studio_sdk")
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(_records()))
    folder = tmp_path / "existing"
    folder.mkdir()
    line = _one_line_error(runner.invoke(app, ["convert", str(pred_path), "--ann", str(GT), "--to", fmt,
                                               "--out", str(folder)]))
    assert f"--out {folder}" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "pred.json"]  # no temp file left


def test_show_page_survives_a_malformed_percent_escape_in_the_link(tmp_path):
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        pytest.skip("headless Chromium is not installed; the page's script was not run")
    pred_path, out = tmp_path / "pred.json", tmp_path / "review"
    pred_path.write_text(json.dumps(_records()))
    result = runner.invoke(app, ["show", "-q", "--pred", str(pred_path), "--images", str(SAMPLE / "images"),
                                 "--ann", str(GT), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for page, fragment in (("index.html", "#class=%E0%A4%A&min=0.5"), ("queue.html", "#status=%zz")):
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                               (out / page).as_uri() + fragment], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert 'data-ready="1"' in proc.stdout, f"the script of {page}{fragment} stopped"


def test_convert_to_stdout_prints_nothing_when_a_later_record_fails(tmp_path):
    preds = _records()
    preds[-1]["segmentation"] = {"size": [1, 1], "counts": "1"}  # the last image's record is broken
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(preds))
    result = runner.invoke(app, ["convert", str(pred_path), "--ann", str(GT), "--to", "results", "--out", "-"])
    line = _one_line_error(result)
    assert "record 18" in line
    assert result.stdout == ""  # not the first image's half of a JSON array
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_records()))
    result = runner.invoke(app, ["convert", str(good), "--ann", str(GT), "--to", "results", "--out", "-", "-q"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == len(_records())


@pytest.mark.parametrize("bbox", ["abc", [1, 2], ["a", 1, 2, 3]])
def test_a_malformed_bbox_is_one_line_in_show_and_convert(tmp_path, bbox):
    preds = _records()
    preds[2]["bbox"] = bbox
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(preds))
    shown = runner.invoke(app, ["show", "-q", "--pred", str(pred_path), "--images", str(SAMPLE / "images"),
                                "--ann", str(GT), "--out", str(tmp_path / "review")])
    assert "record 2 (image 139): 'bbox'" in _one_line_error(shown)
    assert not (tmp_path / "review").exists()
    for fmt in (["--to", "yolo", "--yolo-boxes", "--out", str(tmp_path / "yolo")],
                ["--to", "dataset", "--out", str(tmp_path / "dataset.json")]):
        converted = runner.invoke(app, ["convert", str(pred_path), "--ann", str(GT), *fmt])
        assert "record 2 (image 139): 'bbox'" in _one_line_error(converted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.json"]


def test_the_table_note_names_what_the_table_shows_for_undefined(tmp_path):
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(_records()))
    result = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(pred_path), "--split", "ov"])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.stdout  # AP_novel: no novel-class ground truth on these two images
    assert "- n/a (-1 in --json) = undefined" in result.stdout


def test_eval_reads_json_with_a_byte_order_mark_as_show_and_convert_do(tmp_path):
    preds = _records()
    whole, lines = tmp_path / "pred.json", tmp_path / "pred.jsonl"
    whole.write_text(json.dumps(preds), encoding="utf-8-sig")
    lines.write_text("\n".join(json.dumps(p) for p in preds), encoding="utf-8-sig")
    aps = []
    for path in (whole, lines):
        result = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(path), "--json", "-", "-q"])
        assert result.exit_code == 0, result.output
        aps.append(json.loads(result.stdout)["result"]["metrics"]["AP"])
    assert aps[0] == aps[1] == pytest.approx(0.465, abs=1e-3)
