"""The labeling engine's Python API and the inputs that must never go silently wrong, end to end
with the `tiny` model (real architecture, random weights) on real COCO images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ovsam_cli.label as label_mod
import ovsam_model.labeling.api as api_mod
from ovsam_model import label_images, open_labeler
from ovsam_model.io.detections import InputError

from test_cli_label import app, cached_model, mini  # noqa: F401  (fixtures: the cached tiny models, the mini-val data)

REPO = Path(__file__).resolve().parents[1]


def cli(*args, input=None):
    return CliRunner().invoke(app, ["label", "--model", "tiny", "--device", "cpu", "--workers", "0", *map(str, args)],
                              input=input)


def api(images, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("device", "cpu")
    kw.setdefault("workers", 0)
    return label_images(images, **kw)


def test_python_api_and_cli_give_identical_records(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    r = cli("--boxes", tmp_path / "b.json", "--images", root / "images", "--ann", root / "instances.json",
            "--out", tmp_path / "cli.json", "-q")
    assert r.exit_code == 0, r.output
    summary = api(root / "images", boxes=boxes, ann=root / "instances.json", out=tmp_path / "api.json")
    assert (tmp_path / "api.json").read_bytes() == (tmp_path / "cli.json").read_bytes()
    assert summary.images == 3 and summary.records == summary.prompts == len(boxes) and summary.skipped == {}
    # the same records, one image at a time, without any file
    labeler = open_labeler(root / "images", boxes=boxes, ann=root / "instances.json", model="tiny", device="cpu",
                           workers=0)
    streamed = [rec for entry in labeler.entries() for rec in entry["records"]]
    assert [{k: v for k, v in rec.items() if k != "area"} for rec in streamed] == json.loads((tmp_path / "cli.json").read_text())


def test_api_refuses_bad_input_before_building_a_model(mini, tmp_path, monkeypatch):
    root, *_ = mini
    monkeypatch.setattr(api_mod, "load_predictor", lambda *a, **k: pytest.fail("model built before the input check"))
    with pytest.raises(InputError, match="file not found"):
        open_labeler(root / "images", boxes=tmp_path / "nope.json", model="tiny")
    with pytest.raises(InputError, match="exactly one of"):
        open_labeler(root / "images", model="tiny")
    with pytest.raises(InputError, match="has none of the images"):
        open_labeler(root / "images", boxes=[{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 1}],
                     ann=root / "instances.json", model="tiny")


def test_missing_bbox_is_skipped_named_and_strict_refuses(mini, tmp_path):
    root, gt, ids, boxes = mini
    bad = [boxes[0], {"image_id": ids[0], "score": 0.5}, boxes[1], {"image_id": ids[0], "bbox": "x", "score": 1}]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    r = cli("--boxes", tmp_path / "b.json", "--images", root / "images", "--ann", root / "instances.json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2
    assert "skipped 2 of 4 records: malformed record: 2 (record 1: missing field 'bbox', record 3: field 'bbox'" in r.stderr
    r = cli("--boxes", tmp_path / "b.json", "--images", root / "images", "--ann", root / "instances.json", "--strict")
    assert r.exit_code == 2 and "record 1: missing field 'bbox'" in r.stderr and r.stdout == ""


def test_summary_names_unknown_image_ids(mini, tmp_path):
    root, gt, ids, boxes = mini
    extra = [dict(boxes[0], image_id=i) for i in (42, 7, 99, 5)]
    r = cli("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", input=json.dumps(boxes[:2] + extra))
    assert r.exit_code == 0, r.output
    assert "image not in --ann: 4 (image_id 42, image_id 7, image_id 99, ...)" in r.stderr


def test_out_is_required_on_a_terminal(mini, tmp_path, monkeypatch):
    root, gt, ids, boxes = mini
    monkeypatch.setattr(label_mod, "_stdout_is_terminal", lambda: True)
    r = cli("--boxes", "-", "--images", root / "images", input=json.dumps(boxes[:1]))
    assert r.exit_code == 2 and "give --out FILE" in r.stderr and r.stdout == ""
    r = cli("--boxes", "-", "--images", root / "images", "--out", "-", "-q", input=json.dumps(boxes[:1]))
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 1


def _one_image_dataset(tmp_path: Path, name: str, gt: dict, image_id: int, size: tuple[int, int]) -> Path:
    """A dataset JSON of one image `name` of `size` (W, H) with the mini GT's categories."""
    ann = tmp_path / f"{name}.ann.json"
    ann.write_text(json.dumps({"images": [{"id": image_id, "file_name": name, "width": size[0], "height": size[1]}],
                               "categories": gt["categories"], "annotations": []}))
    return ann


def test_16_bit_png_labels_like_its_8_bit_version(mini, tmp_path):
    root, gt, ids, boxes = mini
    rgb = np.array(Image.open(root / "images" / f"{ids[0]:012d}.jpg").convert("L"))
    Image.fromarray(rgb).save(tmp_path / "eight.png")
    Image.fromarray(rgb.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # PIL: mode I;16
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    mine = [b for b in boxes if b["image_id"] == ids[0]]
    size = (rgb.shape[1], rgb.shape[0])
    out = {}
    for name in ("eight.png", "sixteen.png"):
        ann = _one_image_dataset(tmp_path, name, gt, ids[0], size)
        api(tmp_path, boxes=mine, ann=ann, out=tmp_path / f"{name}.json")
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(out["eight.png"]) == len(mine) and out["sixteen.png"] == out["eight.png"]


def test_exif_rotated_jpeg_labels_like_the_physically_rotated_image(mini, tmp_path):
    root, gt, ids, boxes = mini
    upright = Image.open(root / "images" / f"{ids[0]:012d}.jpg").convert("RGB")  # the frame the detector saw
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's frame; tag 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    from PIL import ImageOps

    ImageOps.exif_transpose(Image.open(tmp_path / "tagged.jpg")).save(tmp_path / "rotated.png")  # same pixels, no tag
    mine = [b for b in boxes if b["image_id"] == ids[0]]
    w, h = upright.size
    results = {}
    for name in ("tagged.jpg", "rotated.png"):
        ann = _one_image_dataset(tmp_path, name, gt, ids[0], (w, h))  # --ann holds the rotated (upright) size
        api(tmp_path, boxes=mine, ann=ann, out=tmp_path / f"{name}.json")
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(results["rotated.png"]) == len(mine) and results["tagged.jpg"] == results["rotated.png"]
    # without --ann the folder's sizes are the EXIF-applied ones, as a detector saw them
    shutil.copy(tmp_path / "tagged.jpg", tmp_path / f"{ids[0]:012d}.jpg")
    folder = open_labeler(tmp_path, boxes=mine, model="tiny", device="cpu", workers=0)
    assert folder.images.size(ids[0]) == (h, w)
    # --exif ignore with the upright size in --ann: the stored frame does not fit, and the message says why
    ann = _one_image_dataset(tmp_path, "tagged.jpg", gt, ids[0], (w, h))
    r = cli("--boxes", "-", "--images", tmp_path, "--ann", ann, "--exif", "ignore", input=json.dumps(mine))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [] and "EXIF" in r.stderr and f"{w}×{h}" in r.stderr


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ovsam_model.labeling.parts import PartWriter, part_path
    w = PartWriter(part_path(Path(sys.argv[1])), "fp", {}, resume=False)
    w.append([{"image": {"id": 1}, "records": []}])
    print("running", flush=True)
    time.sleep(60)
""")


def test_a_second_run_on_the_same_out_is_refused(mini, tmp_path):
    root, gt, ids, boxes = mini
    out = tmp_path / "out.json"
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "running"
        part = tmp_path / "out.json.partial.jsonl"
        before = part.read_bytes()
        r = cli("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", "--out", out,
                input=json.dumps(boxes[:2]))
        assert r.exit_code == 2 and f"pid {first.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert part.read_bytes() == before and not out.exists()
    finally:
        first.kill()
        first.wait()
    r = cli("--boxes", "-", "--images", root / "images", "--ann", root / "instances.json", "--out", out, "-q",
            input=json.dumps(boxes[:2]))  # the killed run's lock is gone
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text())) == 2 and not list(tmp_path.glob("*.partial*"))


def test_label_input_errors_come_before_torch(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes[:1]))
    code = textwrap.dedent("""
        import sys
        from ovsam_cli.main import run
        sys.argv = ["ovsam", "label", "--boxes", sys.argv[1], "--images", sys.argv[2], "--ann", sys.argv[3], "--out", sys.argv[4]]
        try:
            run()
        except SystemExit as e:
            print("exit", e.code, "torch" in sys.modules)
    """)
    cases = [(tmp_path / "b.json", root / "images", tmp_path / "nope.json", "--ann"),
             (tmp_path / "nope.json", root / "images", root / "instances.json", "file not found"),
             (tmp_path / "b.json", tmp_path / "no-dir", root / "instances.json", "no such directory")]
    for boxes_path, images, ann, message in cases:
        p = subprocess.run([sys.executable, "-c", code, str(boxes_path), str(images), str(ann), str(tmp_path / "o.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.stdout.strip() == "exit 2 False", (p.stdout, p.stderr)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_batch_shapes_and_workers_do_not_change_records_and_a_resume_names_them(mini, tmp_path):
    root, gt, ids, boxes = mini
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    args = ["--boxes", tmp_path / "b.json", "--images", root / "images", "--ann", root / "instances.json", "-q"]
    assert cli(*args, "--batch-size", 1, "--box-batch", 64, "--out", tmp_path / "a.json").exit_code == 0
    r = cli(*args, "--batch-size", 3, "--box-batch", 7, "--out", tmp_path / "b.json.out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json.out").read_bytes()
    r = CliRunner().invoke(app, ["label", "--model", "tiny", "--device", "cpu", "--workers", "2",
                                 *map(str, args), "--out", str(tmp_path / "w.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "w.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    # exact equality is not promised for every chunk shape (a chunk of 1 prompt takes other
    # kernels), so a resume with another --box-batch or --batch-size is refused by name
    part = tmp_path / "r.json.partial.jsonl"
    from ovsam_model.labeling.parts import PartWriter

    labeler = open_labeler(root / "images", boxes=boxes, ann=root / "instances.json", model="tiny", device="cpu",
                           workers=0, batch_size=2, box_batch=64)
    PartWriter(part, labeler.fingerprint, labeler.options, resume=False).close()
    for change, named in ((["--box-batch", 1], "--box-batch (64 → 1)"), (["--batch-size", 1], "--batch-size (2 → 1)")):
        r = cli(*args, "--out", tmp_path / "r.json", "--resume", *change)
        assert r.exit_code == 2 and named in r.stderr, r.output


def test_devices_spawn_one_process_per_device_and_merge(data_dir, tmp_path):
    """`--devices cpu,cpu`: the job is pickled into two spawned processes, each labels every other
    image, rank 0 merges; the output equals a one-process run."""
    root = data_dir / "coco-detections-sample"
    args = ["--boxes", REPO / "examples" / "detections_139_802.json", "--images", root / "images",
            "--ann", root / "instances_val2017_subset_139_802.json", "-q"]
    assert cli(*args, "--out", tmp_path / "one.json").exit_code == 0
    r = cli(*args, "--out", tmp_path / "two.json", "--devices", "cpu,cpu")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert not list(tmp_path.glob("*.partial*"))
