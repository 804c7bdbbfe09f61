"""The paper-recipe scripts run end to end (with `tiny` standing in for the released models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture()
def coco_root(data_dir, tmp_path):
    """A COCO-shaped folder ($COCO/val2017, $COCO/annotations) with two mini images."""
    mini = data_dir / "coco-val2017-mini"
    gt = json.loads((mini / "instances.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])[:2]
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for im in gt["images"]:
        if im["id"] in ids:
            shutil.copy(mini / "images" / im["file_name"], root / "val2017" / im["file_name"])
    gt["images"] = [im for im in gt["images"] if im["id"] in ids]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return root


def _run(script: str, *args: str, cwd: Path, coco: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COCO": str(coco), "OVSAM_RECIPE_MODEL": "tiny", "OVSAM_RECIPE_MODELS": "tiny"}
    return subprocess.run(["bash", str(RECIPES / script), *args, "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_detector_protocol_recipes(coco_root, tmp_path):
    for script, report in (("tab2_detector_protocol.sh", "tab2_coco.json"), ("tab4_masks_for_detector.sh", "tab4_coco.json")):
        proc = _run(script, "coco", str(tmp_path / "dets.json"), "--workers", "0", cwd=tmp_path, coco=coco_root)
        assert proc.returncode == 0, proc.stderr
        result = json.loads((tmp_path / report).read_text())["result"]
        assert result["num_predictions"] > 0 and 0.0 <= result["metrics"]["AP"] <= 1.0


@pytest.mark.slow
def test_prompt_protocol_recipe(coco_root, tmp_path):
    proc = _run("tab1_prompt_protocol.sh", "coco", "box", "--random-weights", cwd=tmp_path, coco=coco_root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "tab1_coco_box.json").read_text())
    assert [m["name"] for m in report["models"]] == ["tiny"]
    assert report["models"][0]["result"]["num_instances"] > 0
