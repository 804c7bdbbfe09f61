"""Inputs as URIs (`ovsam_model.io.uris`): images, `--boxes` and `--ann` in object storage give the
bytes of the same run on local copies, with and without Ray; a missing object is skipped and
counted, or refused in one line, as a missing local file is; a protocol whose package is missing
names what to install; outputs stay local.

The object storage is real S3 protocol: moto's in-process S3 server (`ThreadedMotoServer`) read
through s3fs, configured by environment variables (fake credentials, `AWS_ENDPOINT_URL`) that
the DataLoader workers and the Ray workers inherit. The tests skip without moto or s3fs
(`pip install -e ".[test]"` installs them)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ovsam_model import label_images
from ovsam_model.io.datasets import load_image_source
from ovsam_model.io.detections import InputError, read_box_records

from test_cli_label import _lvis_gt, cached_model, mini  # noqa: F401  (fixtures: the cached tiny models, the mini-val data)
from conftest import torch_threads
from test_ray import cli, local_ray, summary_lines  # noqa: F401  (the module's local Ray instance)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ovsam-test"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # botocore's and Ray's own


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 (moto) with an empty bucket; the environment points s3fs at it."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
    server_module = pytest.importorskip("moto.server", reason="moto is not installed (pip install -e '.[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
        fs.rm(BUCKET, recursive=True)
    server.stop()


@pytest.fixture(scope="module")
def inputs(mini, s3, tmp_path_factory):
    """Four images of which one is missing, their GT boxes plus a malformed record, and a dataset
    JSON of the four: locally, and the same files under s3://BUCKET/ (images in images/)."""
    root, gt, _, _ = mini
    ids = sorted(im["id"] for im in gt["images"])[:4]
    local = tmp_path_factory.mktemp("uris")
    (local / "images").mkdir()
    for image_id in ids[:3]:
        shutil.copy(root / "images" / f"{image_id:012d}.jpg", local / "images")
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"] if a["image_id"] in ids and not a["iscrowd"]]
    boxes.insert(1, {"image_id": ids[0], "score": 0.5})  # no bbox
    (local / "boxes.json").write_text(json.dumps(boxes))
    (local / "ann.json").write_text(json.dumps({"images": [im for im in gt["images"] if im["id"] in ids],
                                                "categories": gt["categories"], "annotations": []}))
    s3.put(str(local / "images") + "/", f"{BUCKET}/images/", recursive=True)
    for name in ("boxes.json", "ann.json"):
        s3.put(str(local / name), f"{BUCKET}/{name}")
    return local, f"s3://{BUCKET}", ids


@pytest.fixture(scope="module")
def plain(inputs):
    """`ovsam label` on the local copies (one torch thread, as a Ray actor of one CPU)."""
    local, _, _ = inputs
    with torch_threads(1):
        r = cli("--boxes", local / "boxes.json", "--images", local / "images", "--ann", local / "ann.json",
                "--batch-size", 2, "--format", "dataset", "--out", local / "plain.json")
    assert r.exit_code == 0, r.output
    assert "image file missing or corrupt: 1" in r.stderr and "missing field 'bbox'" in r.stderr
    return local / "plain.json", r.stderr


def test_inputs_in_object_storage_give_the_bytes_of_local_copies(inputs, plain, tmp_path):
    """--boxes, --images and --ann as s3:// URIs, images decoded in a DataLoader worker: the same
    dataset JSON (file names, sizes, masks, labels) and the same summary, the missing object
    skipped and counted as a missing local file is."""
    _, uri, ids = inputs
    with torch_threads(1):
        r = cli("--boxes", f"{uri}/boxes.json", "--images", f"{uri}/images", "--ann", f"{uri}/ann.json",
                "--batch-size", 2, "--format", "dataset", "--out", tmp_path / "s3.json", "--workers", 1)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s3.json").read_bytes() == plain[0].read_bytes()
    assert summary_lines(r.stderr) == summary_lines(plain[1])
    assert f"image {ids[3]} ({uri}/images/{ids[3]:012d}.jpg): file not found" in r.stderr


def test_a_folder_listed_in_object_storage_and_file_uris_are_the_local_folder(inputs, mini, s3):
    """Without --ann: ids and sizes of a folder URI (fsspec's find, headers read a block at a time)
    as of the local folder; LVIS file names looked up in one listing; file:// URIs are local paths."""
    local, uri, ids = inputs
    _, gt, _, _ = mini

    def described(source):
        return [(r.id, r.file_name, r.height, r.width) for r in (source.get(i) for i in source.all_ids())]

    remote, here = load_image_source(f"{uri}/images"), load_image_source(local / "images")
    assert described(remote) == described(here) and len(described(here)) == 3
    assert remote.get(ids[0]).path == f"{uri}/images/{ids[0]:012d}.jpg"
    assert remote.get(ids[3]) is None and here.get(ids[3]) is None

    lvis = _lvis_gt({**gt, "images": [im for im in gt["images"] if im["id"] in ids]})
    s3.put(str(local / "images" / f"{ids[0]:012d}.jpg"), f"{BUCKET}/lvis/val2017/{ids[0]:012d}.jpg")
    s3.pipe(f"{BUCKET}/lvis.json", json.dumps(lvis).encode())
    source = load_image_source(f"{uri}/lvis", f"{uri}/lvis.json")
    assert source.kind == "lvis" and source.get(ids[0]).file_name == f"val2017/{ids[0]:012d}.jpg"
    assert source.get(ids[1]).file_name == f"{ids[1]:012d}.jpg"  # in neither: its own name, skipped later

    as_file = load_image_source(f"file://{local / 'images'}", f"file://{local / 'ann.json'}")
    assert as_file.root == local / "images" and described(as_file) == described(load_image_source(
        local / "images", local / "ann.json"))
    assert read_box_records(f"file://{local / 'boxes.json'}", strict=False) == \
        read_box_records(local / "boxes.json", strict=False)


_RUN = """
import json, sys
sys.modules["gcsfs"] = None  # as if gcsfs were not installed
from typer.testing import CliRunner
from ovsam_cli.main import app
results = [(r.exit_code, r.stderr) for r in (CliRunner().invoke(app, args) for args in json.loads(sys.argv[1]))]
print(json.dumps({"results": results, "heavy": [m for m in ("ray", "torch") if m in sys.modules]}))
"""


def test_a_missing_object_or_protocol_package_is_one_line_before_torch(inputs, tmp_path):
    """What is refused for a missing local file is refused for a missing object, with the same
    message naming the URI; a protocol whose package is missing says what to pip install; --out
    stays local. One line each, exit code 2, and torch never imported."""
    local, uri, _ = inputs
    def args(boxes, images, ann, prefix, out=str(tmp_path / "o.json")):
        return ["label", "--model", "tiny", "--out", out, "--boxes", f"{prefix}/{boxes}", "--images",
                f"{prefix}/{images}", "--ann", f"{prefix}/{ann}"]

    mistakes = [("nope.json", "images", "ann.json"), ("boxes.json", "images", "nope.json"),
                ("boxes.json", "nothing", "ann.json")]
    cases = [args(*m, prefix=p) for m in mistakes for p in (str(local), uri)]
    cases += [args("boxes.json", "images", "ann.json", prefix="gs://bucket"),
              args("boxes.json", "images", "ann.json", prefix=uri, out=f"{uri}/o.json")]
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(cases)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    lines = []
    for case, (code, stderr) in zip(cases, report["results"]):
        shown = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(shown) == 1, (case, stderr)
        lines.append(shown[0])
    for i in range(len(mistakes)):  # the local message, with the URI in place of the local path
        assert lines[2 * i + 1] == lines[2 * i].replace(str(local), uri), lines[2 * i: 2 * i + 2]
    assert lines[0].endswith("nope.json: file not found") and "--ann" in lines[2] and "no such directory" in lines[4]
    assert "gs:// needs a package that is not installed (pip install gcsfs)" in lines[6]
    assert f"--out {uri}/o.json: outputs are written to a local file" in lines[7]
    assert report["heavy"] == []
    with pytest.raises(InputError, match="outputs are written to a local file"):
        label_images(f"{uri}/images", boxes=f"{uri}/boxes.json", out=f"{uri}/o.json")


def test_ray_workers_decode_images_from_object_storage(s3, local_ray, inputs):
    """The decoding stage of `--ray` (`ray_runner._decode_row`, as a Ray task) reads the images
    from S3 with the driver's configuration (its environment, which the workers inherit): the
    pixels of the local copies, and a missing object is the skipped image a missing file is.
    (Past decoding the Ray pipeline never sees a path; a whole `--ray` run on these URIs gave the
    plain run's bytes, but costs ~40 s more here.)"""
    import pickle

    import numpy as np
    import ray

    from ovsam_model.io.images import read_image
    from ovsam_model.labeling.ray_runner import _decode_row

    local, uri, ids = inputs
    remote, here = load_image_source(f"{uri}/images", f"{uri}/ann.json"), load_image_source(local / "images",
                                                                                            local / "ann.json")
    task = [(remote.get(i), []) for i in (ids[0], ids[3])]
    row = {"block": 0, "task": pickle.dumps(task)}
    out, = ray.get(ray.remote(_decode_row).remote(row, prepare=np.array, exif="auto"))
    loaded = pickle.loads(out["loaded"])
    assert np.array_equal(loaded[0].prepared, read_image(here.get(ids[0]).path).array)
    assert loaded[1].prepared is None and (loaded[1].error, loaded[1].reason) == \
        ("file not found", "image file missing or corrupt")
