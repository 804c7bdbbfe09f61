"""Proof that the training commands learn (issue 9): the `recipes/tiny_*.sh` runs (tiny-256
models, CPU, a few minutes) on real COCO images split by image into training and held-out
parts, judged on the held-out images and against references computed in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def mini(data_dir) -> tuple[Path, Path]:
    root = data_dir / "coco-val2017-mini"
    if not (root / "instances.json").is_file():
        pytest.skip("no coco-val2017-mini")
    return root / "images", root / "instances.json"


def _recipe(name: str, images: Path, ann: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run recipes/NAME; `extra` options go after the recipe's own (the last occurrence wins)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(RECIPES / name), str(images), str(ann), str(out), *extra], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _ovsam(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ovsam_cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _check_run_outputs(out: Path, command: str, total: int) -> list[dict]:
    """Every step once in the log (0: the eval before training), config.json, curves.png."""
    records = _records(out)
    assert [r["step"] for r in records] == list(range(total + 1))
    assert set(records[0]) == {"step", "epoch", "eval"}
    for r in records[1:]:
        assert {"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= set(r)
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == command and config["model"] == "tiny-256"
    assert config["options"]["model"] == "tiny-256" and config["versions"]["torch"]
    assert "commit" in config and "weights" in config
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return [r for r in records if "eval" in r]


def test_distill_learns(mini, tmp_path):
    out = tmp_path / "distill"
    done = _recipe("tiny_distill.sh", *mini, out)
    assert f"{out}/curves.png" in done.stderr
    evals = _check_run_outputs(out, "distill", 180)
    first, last = evals[0]["eval"], evals[-1]["eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 180
    assert first["mse"] == first["mse_untrained"]  # the untrained student is the step-0 student
    assert last["mse"] <= 0.5 * last["mse_untrained"], last
    assert last["mse"] < last["mse_constant"], last


def _gt_boxes(ann: Path) -> list[dict]:
    gt = json.loads(ann.read_text())
    return [{"image_id": a["image_id"], "bbox": a["bbox"], "category_id": a["category_id"], "score": 1.0}
            for a in gt["annotations"]]


def _prompt_eval(ann: Path, images: Path, out: Path, checkpoint: Path | None) -> dict:
    report = out / f"eval-{ann.stem}-{'trained' if checkpoint else 'step0'}.json"
    weights = ["--checkpoint", f"clip2sam={checkpoint}"] if checkpoint else []
    _ovsam("eval", "--protocol", "prompt", "--ann", str(ann), "--images", str(images), "--model", "tiny-256",
           *weights, "--device", "cpu", "--json", str(report), "--quiet")
    return json.loads(report.read_text())["models"][0]["result"]


def test_finetune_learns_masks_and_labels_and_its_file_evaluates_the_same(mini, tmp_path):
    """The recipe's run (1,600 iterations): box-prompt mask IoU on the base-class instances of
    the training images (the classes it trains on) from under 0.1 to at least 0.6, top-1
    accuracy there at least doubled; held-out mask IoU and accuracy above their step-0 values;
    and `ovsam eval` on the saved file repeats the run's final held-out figures."""
    images, _ = mini
    out = tmp_path / "finetune"
    _recipe("tiny_finetune.sh", *mini, out)
    evals = _check_run_outputs(out, "finetune", 1600)
    first, last = evals[0]["eval"], evals[-1]["eval"]
    assert [e["step"] for e in evals] == [0, 400, 800, 1200, 1600]
    assert last["acc"] > first["acc"], (first, last)  # held-out labels better than at step 0
    assert last["iou"] > first["iou"], (first, last)  # and held-out masks
    config = json.loads((out / "config.json").read_text())["options"]
    assert config["cache_features"] is True and config["flip"] == 0.0 and config["resize_ratio"] == [1.0, 1.0]

    split, weights = out / "split", out / "clip2sam_finetuned.pth"
    # `ovsam eval` on the saved file reports the run's final held-out figures
    again = _prompt_eval(split / "heldout.json", images, out, weights)
    for ours, theirs in (("iou", "miou"), ("iou_base", "miou_base"), ("iou_novel", "miou_novel"), ("acc", "acc"),
                         ("acc_base", "acc_base"), ("acc_novel", "acc_novel")):
        assert again[theirs] == pytest.approx(last[ours], abs=2e-6), ours
    # the step-0 model of the run is `ovsam eval --model tiny-256`'s: same held-out figures
    start = _prompt_eval(split / "heldout.json", images, out, None)
    assert start["miou"] == pytest.approx(first["iou"], abs=2e-6) and start["acc"] == pytest.approx(first["acc"])
    # on the training images: the masks fit, and accuracy at least doubled from the step-0 model
    trained = _prompt_eval(split / "train.json", images, out, weights)
    step0 = _prompt_eval(split / "train.json", images, out, None)
    assert step0["miou_base"] < 0.1 and trained["miou_base"] >= 0.6, (step0, trained)
    assert trained["acc_base"] >= 2 * step0["acc_base"] and trained["acc_base"] > step0["acc_base"], (step0, trained)

    # `ovsam label --checkpoint clip2sam=...` labels the held-out images with the trained masks
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_gt_boxes(split / "heldout.json")))
    labelled = tmp_path / "labelled.json"
    _ovsam("label", "--images", str(split / "heldout_images"), "--boxes", str(boxes), "--ann",
           str(split / "heldout.json"), "--model", "tiny-256", "--checkpoint", f"clip2sam={weights}",
           "--format", "results", "--label-source", "detector", "--device", "cpu", "--out", str(labelled), "--quiet")
    records = json.loads(labelled.read_text())
    gt = json.loads((split / "heldout.json").read_text())
    assert len(records) == len(gt["annotations"])
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    per_image: dict[int, list[dict]] = {}
    for r in records:  # an image's records come in the order of its prompts
        per_image.setdefault(r["image_id"], []).append(r)
    ious = []
    for ann in gt["annotations"]:
        rec = per_image[ann["image_id"]].pop(0)
        assert rec["detector_category_id"] == ann["category_id"]
        h, w = sizes[ann["image_id"]]
        truth = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))) > 0
        ours = mask_utils.decode(rec["segmentation"]) > 0
        ious.append((truth & ours).sum() / (truth | ours).sum())
    # label's default mask post-processing is the fast one, eval's the published exact one
    assert sum(ious) / len(ious) == pytest.approx(last["iou"], abs=0.03)
