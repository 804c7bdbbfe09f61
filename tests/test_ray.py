"""`ovsam label --ray`: the labeling engine driven by Ray Data gives the bytes of a run without
Ray, survives a killed predictor actor, resumes without recomputing a finished block, and fails
on bad inputs as a run without Ray does. One local Ray instance (2 CPUs) serves the module (the
tests that need it skip without Ray); the model is `tiny` (random weights) on real COCO images.

CPU results depend on torch's thread count, so the runs without Ray that the Ray runs are
compared with use one thread, as the actors do (`--ray-cpus-per-actor 1`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ovsam_model import label_images, open_labeler
from ovsam_model.everything import EverythingSettings
from ovsam_model.labeling.engine import LabelEvents
from ovsam_model.labeling.ray_runner import RayLabeler, RaySettings  # imports no ray

from conftest import torch_threads
from test_cli_label import app, cached_model, mini  # noqa: F401  (fixtures: the cached tiny models, the mini-val data)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own defaults
ACTOR = RaySettings(actors=1, cpus_per_actor=1, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: 2 CPUs (one actor and one decoding task at a time)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()




@pytest.fixture(scope="module")
def boxes_inputs(mini, tmp_path_factory):
    """Four images of which one is missing from the folder, their GT boxes as detections, and a
    malformed record: what must be skipped and counted, with and without Ray."""
    root, gt, _, _ = mini
    ids = sorted(im["id"] for im in gt["images"])[:4]
    tmp = tmp_path_factory.mktemp("ray-boxes")
    images = tmp / "images"
    images.mkdir()
    for image_id in ids[:3]:
        shutil.copy(root / "images" / f"{image_id:012d}.jpg", images)
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"] if a["image_id"] in ids and not a["iscrowd"]]
    boxes.insert(1, {"image_id": ids[0], "score": 0.5})  # no bbox
    (tmp / "boxes.json").write_text(json.dumps(boxes))
    return tmp, images, root / "instances.json", ids


def cli(*args):
    return CliRunner().invoke(app, ["label", "--model", "tiny", "--device", "cpu", "--workers", "0",
                                    *map(str, args)])


def summary_lines(stderr: str) -> list[str]:
    """The summary's counts, without the timing."""
    return sorted(line.split(" in ")[0] for line in stderr.splitlines() if line.startswith(("labeled ", "skipped ")))


def test_cli_ray_is_byte_identical_and_a_killed_actor_loses_nothing(local_ray, boxes_inputs):
    """`ovsam label --ray`: the predictor actor is SIGKILLed after the first block; Ray restarts
    it and retries its batches, and the output and the summary (skipped records by reason) are
    those of `ovsam label` without Ray."""
    tmp, images, ann, ids = boxes_inputs
    args = ["--boxes", tmp / "boxes.json", "--images", images, "--ann", ann, "--batch-size", 1]
    with torch_threads(1):  # as in an actor of one CPU (CPU kernels round by thread count)
        plain = cli(*args, "--out", tmp / "plain.json")
    assert plain.exit_code == 0, plain.output
    assert "image file missing or corrupt" in plain.stderr and "missing field 'bbox'" in plain.stderr

    runs: list[tuple[RayLabeler, int]] = []
    original = RayLabeler.label_blocks

    def kill_after_first_block(self, image_ids):
        for n, block in enumerate(original(self, image_ids)):
            yield block
            if n == 0:  # the actor that labeled it dies as a preempted or OOM-killed worker does
                pid = next(iter(self.workers))
                runs.append((self, pid))
                os.kill(pid, signal.SIGKILL)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RayLabeler, "label_blocks", kill_after_first_block)
        r = cli(*args, "--out", tmp / "ray.json", "--ray", "--ray-actors", 1, "--ray-cpus-per-actor", 1)
    assert r.exit_code == 0, r.output
    assert (tmp / "ray.json").read_bytes() == (tmp / "plain.json").read_bytes()
    assert summary_lines(r.stderr) == summary_lines(plain.stderr)  # images, prompts, records, skipped by reason
    assert "ray: 1 predictor actor (1 CPU each)" in r.stderr
    assert not list(tmp.glob("ray.json.partial*"))
    (labeler, killed), = runs
    assert killed in labeler.workers and len(labeler.workers) == 2  # a restarted actor labeled the rest
    assert sum(labeler.workers.values()) == len(ids) and labeler.duplicates == 0  # each block written once
    assert not set(labeler.decoders) & set(labeler.workers)  # decoded in CPU tasks, not in the actors


class Interrupt(LabelEvents):
    """Ctrl-C after the first block is written."""

    def batch_done(self, images: int, prompts: int) -> None:
        raise KeyboardInterrupt


def test_everything_on_ray_resumes_without_recomputing_a_block_and_equals_the_plain_run(local_ray, mini, tmp_path):
    root, gt, _, _ = mini
    ids = sorted(im["id"] for im in gt["images"])[:3]
    ann = tmp_path / "three.json"
    ann.write_text(json.dumps({"images": [im for im in gt["images"] if im["id"] in ids],
                               "categories": gt["categories"], "annotations": []}))
    settings = EverythingSettings(points_per_side=4, stability_score_thresh=0.0, stability_score_offset=0.01,
                                  drop_background=False)
    common = dict(everything=settings, ann=ann, fmt="dataset", model="tiny", device="cpu", batch_size=1)
    with torch_threads(1):
        plain = label_images(root / "images", out=tmp_path / "plain.json", workers=0, **common)
    assert plain.records and plain.images == len(ids)

    out = tmp_path / "ray.json"
    labeler = open_labeler(root / "images", events=Interrupt(), ray=ACTOR,
                           **{k: v for k, v in common.items() if k != "fmt"})
    with pytest.raises(KeyboardInterrupt):
        labeler.run(out, "dataset")
    assert not out.exists()
    part = Path(f"{out}.partial.jsonl")
    written = [json.loads(line)["image"]["id"] for line in part.read_text().splitlines() if line.startswith('{"image"')]
    assert len(written) >= 1

    resumed = open_labeler(root / "images", ray=ACTOR, **{k: v for k, v in common.items() if k != "fmt"})
    summary = resumed.run(out, "dataset", resume=True)
    assert out.read_bytes() == (tmp_path / "plain.json").read_bytes()
    assert summary.resumed == len(written) and summary.images == len(ids) - len(written)
    assert sum(resumed.workers.values()) == len(ids) - len(written)  # no finished block labeled again
    assert not part.exists()


_RUN = """
import json, sys
from typer.testing import CliRunner
from ovsam_cli.main import app
results = [(r.exit_code, r.stderr) for r in (CliRunner().invoke(app, args) for args in json.loads(sys.argv[1]))]
print(json.dumps({"results": results, "heavy": [m for m in ("ray", "torch") if m in sys.modules]}))
"""


def test_bad_inputs_and_an_unreachable_cluster_are_one_line_errors_before_ray_or_torch(mini, tmp_path):
    root, _, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes[:2]))
    base = ["label", "--model", "tiny", "--images", str(root / "images"), "--ann", str(root / "instances.json"),
            "--out", str(tmp_path / "o.json")]
    good = ["--boxes", str(tmp_path / "b.json")]
    cases = [
        (base + good + ["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1"),
        (base + good + ["--ray", "--ray-address", "ray://127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
        (base + ["--boxes", str(tmp_path / "nope.json"), "--ray"], "file not found"),
        (base + good + ["--ray-actors", "2"], "--ray-actors applies to --ray only"),
        (base + good + ["--ray", "--ray-actors", "0"], "--ray-actors must be at least 1"),
        (base + good + ["--ray", "--devices", "cpu,cpu"], "not with --devices or torchrun"),
    ]
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps([args for args, _ in cases])], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    for (args, message), (code, stderr) in zip(cases, report["results"]):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, stderr)
    assert report["heavy"] == []
