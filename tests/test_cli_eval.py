"""`ovsam eval` through typer's CliRunner: tables, JSON reports, user errors, prompt protocol."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from ovsam_cli.eval import eval_command
from ovsam_model.types import Prediction

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SAMPLE = DATA / "coco-detections-sample"
GT = SAMPLE / "instances_val2017_subset_139_802.json"
pytestmark = pytest.mark.skipif(not GT.is_file(), reason=f"test data absent: {SAMPLE}")

app = typer.Typer(no_args_is_help=True)
app.command("eval")(eval_command)


@app.command("version")
def _version() -> None:  # a second command, so that `eval` is a real subcommand as in ovsam_cli.main
    """Print nothing."""


runner = CliRunner()


@pytest.fixture()
def segm_preds(tmp_path) -> Path:
    preds = json.loads((SAMPLE / "instances_val2014_fakesegm100_results.json").read_text())
    path = tmp_path / "labeled.json"
    path.write_text(json.dumps([p for p in preds if p["image_id"] in (139, 802)]))
    return path


def _reference_segm_ap(pred_file: Path) -> float:
    preds = json.loads(pred_file.read_text())
    for p in preds:
        p.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(GT))
        ev = COCOeval(gt, gt.loadRes(preds), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _assert_one_line_error(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_detector_table_on_stdout(segm_preds):
    result = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(segm_preds)])
    assert result.exit_code == 0, result.output
    ap = _reference_segm_ap(segm_preds)
    assert f"{100 * ap:.1f}" in result.stdout and "46.5" in result.stdout
    assert "AP75" in result.stdout


def test_detector_json_stdout(segm_preds):
    result = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(segm_preds), "--split", "ov",
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is only the JSON; the table went to stderr
    assert "AP_base" in result.stderr
    assert report["protocol"] == "detector" and report["ovsam_version"]
    assert report["settings"]["split"] == "ov" and report["settings"]["iou_type"] == "segm"
    assert len(report["settings"]["ann_sha256"]) == 64
    metrics = report["result"]["metrics"]
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_base", "AP_novel"}
    assert any("65" in n for n in report["result"]["notes"])
    all_split = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(segm_preds), "--json", "-", "-q"])
    assert json.loads(all_split.stdout)["result"]["metrics"]["AP"] == pytest.approx(_reference_segm_ap(segm_preds))
    assert all_split.stderr.strip() == ""


def test_detector_json_file_is_written(segm_preds, tmp_path):
    out = tmp_path / "reports" / "ap.json"
    result = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(segm_preds), "--json", str(out),
                                 "--iou-type", "segm"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["result"]["metrics"]["AP"] == pytest.approx(_reference_segm_ap(segm_preds))
    assert "AP50" in result.stdout  # the table is the only stdout output
    assert [p.name for p in out.parent.iterdir()] == ["ap.json"]  # no temp file left


def test_user_errors_are_one_line(segm_preds, tmp_path):
    _assert_one_line_error(runner.invoke(app, ["eval", "--ann", str(tmp_path / "no.json"), "--pred", str(segm_preds)]))
    _assert_one_line_error(runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(tmp_path / "no.json")]))
    _assert_one_line_error(runner.invoke(app, ["eval", "--ann", str(GT)]))  # no --pred
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"image_id\": ")
    res = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(broken)])
    _assert_one_line_error(res)
    assert "not valid JSON" in res.stderr
    wrong = tmp_path / "wrong.json"
    preds = json.loads(segm_preds.read_text())
    wrong.write_text(json.dumps(preds + [dict(preds[0], image_id=4242)]))
    res = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(wrong)])
    _assert_one_line_error(res)
    assert "4242" in res.stderr
    boxes = SAMPLE / "instances_val2014_fakebbox100_results.json"
    res = runner.invoke(app, ["eval", "--ann", str(GT), "--pred", str(boxes)])
    _assert_one_line_error(res)  # other images' ids
    _assert_one_line_error(runner.invoke(app, ["eval", "--protocol", "prompt", "--ann", str(GT)]))
    prompt = ["eval", "--protocol", "prompt", "--ann", str(GT), "--images", str(SAMPLE / "images"), "--model", "tiny",
              "--random-weights", "--cache-dir", str(tmp_path / "cache"), "-q"]
    for extra, message in ((["--device", "gpu0"], "--device"), (["--checkpoint", "head"], "COMPONENT=PATH"),
                           (["--vocab", "bogus", "--device", "cpu"], "unknown vocabulary 'bogus'")):
        res = runner.invoke(app, [*prompt, *extra])
        _assert_one_line_error(res)
        assert message in res.stderr


class _OraclePredictor:
    """Returns the GT masks (in GT order) of the image with the same size, and the GT labels."""

    weights_sha256 = {"head": "0" * 64}

    def __init__(self, gt_path: Path):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(gt_path))
        cats = self.coco.dataset["categories"]
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [c["name"] for c in cats]
        self.by_size = {(i["height"], i["width"]): i["id"] for i in self.coco.dataset["images"]}

    def predict(self, images, prompts):
        out = []
        for image, p in zip(images, prompts):
            anns = [a for a in self.coco.imgToAnns[self.by_size[image.shape[:2]]] if not a["iscrowd"]]
            assert len(anns) == len(p)
            masks = torch.as_tensor(np.stack([self.coco.annToMask(a) for a in anns])).bool()
            labels = torch.tensor([self.category_ids.index(a["category_id"]) for a in anns])
            out.append(Prediction(masks=masks, labels=labels, scores=torch.ones(len(anns)),
                                  topk_labels=labels[:, None], topk_scores=torch.ones(len(anns), 1)))
        return out


def test_prompt_protocol_with_fake_predictors(monkeypatch):
    import ovsam_model.builder as builder

    gt = json.loads(GT.read_text())
    assert len({(i["height"], i["width"]) for i in gt["images"]}) == len(gt["images"])
    built = []

    def fake_build(name, **kwargs):
        built.append((name, kwargs))
        return _OraclePredictor(GT)

    monkeypatch.setattr(builder, "build_predictor", fake_build)
    result = runner.invoke(app, ["eval", "--protocol", "prompt", "--prompt", "point", "--ann", str(GT),
                                 "--images", str(SAMPLE / "images"), "--model", "oracle-a,oracle-b",
                                 "--batch-size", "2", "--device", "cpu", "--checkpoint", "head=/x/h.pth",
                                 "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["name"] for m in report["models"]] == ["oracle-a", "oracle-b"]
    assert [b[0] for b in built] == ["oracle-a", "oracle-b"]
    assert built[0][1]["overrides"] == {"head": Path("/x/h.pth")} and built[0][1]["device"] == "cpu"
    n = sum(not a["iscrowd"] for a in gt["annotations"])
    for entry in report["models"]:
        r = entry["result"]
        assert entry["weights_sha256"] == {"head": "0" * 64}
        assert r["miou"] == pytest.approx(1.0) and r["acc"] == 1.0
        assert r["num_instances"] == n and r["prompt"] == "point"
    assert report["settings"]["prompt"] == "point" and report["settings"]["dataset"] == "coco"


def test_prompt_protocol_unknown_model():
    res = runner.invoke(app, ["eval", "--protocol", "prompt", "--ann", str(GT), "--images", str(SAMPLE / "images"),
                              "--model", "no-such-model", "--device", "cpu", "-q"])
    _assert_one_line_error(res)
    assert "no-such-model" in res.stderr


def test_prompt_protocol_with_tiny_model(tmp_path):
    """The real (small, random-weight) architecture end to end; the numbers themselves are meaningless."""
    out = tmp_path / "tiny.json"
    res = runner.invoke(app, ["eval", "--protocol", "prompt", "--ann", str(GT), "--images", str(SAMPLE / "images"),
                              "--model", "tiny", "--random-weights", "--max-images", "2", "--batch-size", "2",
                              "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "tiny" in res.stdout and "IoU_b" in res.stdout
    r = json.loads(out.read_text())["models"][0]["result"]
    gt = json.loads(GT.read_text())
    assert r["num_images"] == 2
    assert r["num_instances"] + r["num_skipped_empty"] == sum(not a["iscrowd"] for a in gt["annotations"])
    assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["acc"] <= 1.0


def test_prompt_protocol_report_does_not_depend_on_workers(tmp_path):
    """--workers 0 (images read in this process) and --workers 2 write the same JSON report."""
    reports = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        res = runner.invoke(app, ["eval", "--protocol", "prompt", "--prompt", "point", "--ann", str(GT),
                                  "--images", str(SAMPLE / "images"), "--model", "tiny", "--random-weights",
                                  "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--workers", workers,
                                  "--json", str(out), "-q"])
        assert res.exit_code == 0, res.output
        reports.append(json.loads(out.read_text()))
    assert reports[1] == reports[0]
    assert reports[0]["models"][0]["result"]["num_images"] == 2


def _fake_builds(monkeypatch) -> list:
    import ovsam_model.builder as builder

    built = []

    def fake_build(name, **kwargs):
        built.append((name, kwargs))
        return _OraclePredictor(GT)

    monkeypatch.setattr(builder, "build_predictor", fake_build)
    return built


def test_prompt_protocol_build_options_and_settings(monkeypatch):
    """SAM's exact mask post-processing, --roi-box, and the GT's categories as the default vocabulary."""
    from ovsam_model.vocab import Vocabulary

    built = _fake_builds(monkeypatch)
    base = ["eval", "--protocol", "prompt", "--ann", str(GT), "--images", str(SAMPLE / "images"), "--model", "oracle",
            "--device", "cpu", "--json", "-"]
    res = runner.invoke(app, base)
    assert res.exit_code == 0, res.output
    kwargs = built[-1][1]
    assert kwargs["mask_postprocess"] == "exact" and kwargs["roi_box"] == "mask"
    gt_cats = sorted((c["id"], c["name"]) for c in json.loads(GT.read_text())["categories"])
    assert isinstance(kwargs["vocab"], Vocabulary)
    assert list(zip(kwargs["vocab"].category_ids, kwargs["vocab"].class_names)) == gt_cats
    assert f"categories of --ann {GT}" in res.stderr
    settings = json.loads(res.stdout)["settings"]
    assert settings["mask_postprocess"] == "exact" and settings["roi_box"] == "mask"
    assert settings["vocab"] == "ann categories"
    res = runner.invoke(app, [*base, "--vocab", "coco", "--roi-box", "prompt", "-q"])
    assert res.exit_code == 0, res.output
    assert built[-1][1]["vocab"] == "coco" and built[-1][1]["roi_box"] == "prompt"
    settings = json.loads(res.stdout)["settings"]
    assert settings["roi_box"] == "prompt" and settings["vocab"] == "coco"


def test_prompt_table_never_cuts_model_names(monkeypatch):
    """At 80 columns the names fold inside their column (every character kept, every number
    shown); on a wide terminal each name is on one line."""
    _fake_builds(monkeypatch)
    names = ["baseline-image-crop-with-a-long-name", "baseline-feature-crop-with-another-name"]
    args = ["eval", "--protocol", "prompt", "--ann", str(GT), "--images", str(SAMPLE / "images"),
            "--model", ",".join(names), "--device", "cpu", "-q"]
    res = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line[:1] in "┏┃┡│└"]  # the table, not the notes
    assert "…" not in "".join(lines) and all(len(line) <= 80 for line in lines)
    first_column = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))
    assert first_column == "".join(names)
    rows = [line for line in lines if line.startswith("│") and "100.0" in line]
    assert len(rows) == 2 and all(line.rstrip().endswith("│") for line in rows)  # no column cut off
    assert "coco box-prompt protocol (%)" in res.stdout
    wide = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert wide.exit_code == 0, wide.output
    assert all(any(name in line for line in wide.stdout.splitlines()) for name in names)


def test_closed_stdout_pipe_exits_quietly(segm_preds):
    """`ovsam eval ... | head` with the reader gone: no message, exit code 141 (128 + SIGPIPE)."""
    import subprocess
    import sys

    for args in (["eval", "--ann", str(GT), "--pred", str(segm_preds)], ["--version"]):  # rich table; typer.echo
        proc = subprocess.Popen([sys.executable, "-m", "ovsam_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[1])
        proc.stdout.close()  # before anything is written: the first write meets a closed pipe
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, (args, stderr)
        assert stderr == ""
