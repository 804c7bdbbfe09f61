"""The engine's records, part files (resume, torn lines, locks) and output formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pycocotools import mask as mask_utils

from ovsam_model.io.datasets import ImageRecord
from ovsam_model.io.detections import InputError, PromptRecord, SkipReason
from ovsam_model.io.masks import encode_rle, mask_polygons, rle_bbox
from ovsam_model.labeling.formats import get_format
from ovsam_model.labeling.parts import PartIndex, PartWriter, changed_options, is_finished, part_path, scan_part
from ovsam_model.labeling.records import build_records, skipped_entry
from ovsam_model.types import Prediction


def _masks(n=3, h=17, w=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) > 0.6
    m[-1] = False  # one empty mask
    return m


def _image(tmp_path, iid=7, h=17, w=23):
    return ImageRecord(iid, tmp_path / "x.jpg", "x.jpg", h, w)


def _prediction(m, rle=False):
    n = m.shape[0]
    return Prediction(
        masks=None if rle else m,
        rles=encode_rle(m) if rle else None,
        labels=torch.tensor([1, 0, 2][:n]),
        scores=torch.tensor([0.5, 0.25, 1.0][:n]),
        topk_labels=torch.tensor([[1, 0], [0, 2], [2, 1]][:n]),
        topk_scores=torch.tensor([[0.5, 0.3], [0.25, 0.2], [1.0, 0.0]][:n]),
    )


def test_records_ovsam_and_detector_modes(tmp_path):
    m = _masks()
    prompts = [PromptRecord(i, 7, 0.8, 18, (1.0, 2.0, 11.0, 6.0)) for i in range(3)]
    recs = build_records(_image(tmp_path), prompts, _prediction(m), category_ids=[10, 20, 30])
    assert [r["category_id"] for r in recs] == [20, 10, 30]
    assert [r["score"] for r in recs] == [pytest.approx(0.4), pytest.approx(0.2), pytest.approx(0.8)]
    assert recs[0]["topk"] == [{"category_id": 20, "prob": 0.5}, {"category_id": 10, "prob": pytest.approx(0.3)}]
    assert recs[2]["bbox"] == [1.0, 2.0, 10.0, 4.0]  # empty mask → the prompt box, XYWH
    assert recs[0]["bbox"] == rle_bbox([recs[0]["segmentation"]])[0]
    assert [r["area"] for r in recs] == m.flatten(1).sum(1).tolist()
    assert all(r["detector_score"] == 0.8 and r["detector_category_id"] == 18 for r in recs)
    assert build_records(_image(tmp_path), prompts, _prediction(m, rle=True), category_ids=[10, 20, 30]) == recs
    det = build_records(_image(tmp_path), prompts, _prediction(m), category_ids=[10, 20, 30], label_source="detector")
    assert [(r["category_id"], r["score"]) for r in det] == [(18, 0.8)] * 3
    with pytest.raises(ValueError, match="masks"):
        build_records(_image(tmp_path, h=5), prompts, _prediction(m), category_ids=[10, 20, 30])


def _entry(iid, records=(), **extra):
    return {"image": {"id": iid, "file_name": f"{iid}.jpg", "height": 2, "width": 2}, "records": list(records), **extra}


def test_part_file_resume_ignores_torn_line(tmp_path):
    out = tmp_path / "out.json"
    path = part_path(out)
    w = PartWriter(path, "fp1", {"--topk": 5}, resume=False)
    w.append([_entry(3, [{"a": 1}]), _entry(1)])
    w.close()
    with open(path, "a") as f:
        f.write('{"record":{"c":3}}\n{"image": {"id": 9}, "n')  # killed mid-write: a record and a torn image line
    scan = scan_part(path)
    assert sorted(scan.entries) == [1, 3] and scan.header["fingerprint"] == "fp1"
    w = PartWriter(path, "fp1", {"--topk": 5}, resume=True)
    assert sorted(w.done) == [1, 3]
    w.append([_entry(9, [{"b": 2}])])
    w.finish(world=1)
    w.close()
    assert sorted(scan_part(path).entries) == [1, 3, 9] and is_finished(path, 1) and not is_finished(path, 2)
    with pytest.raises(InputError, match=r"other options: --topk \(5 → 3\)"):
        PartWriter(path, "fp2", {"--topk": 3}, resume=True)
    index = PartIndex(out, "fp1")
    assert [(e["image"]["id"], list(e["records"])) for e in index.read([9, 1, 3])] == [(9, [{"b": 2}]), (1, []), (3, [{"a": 1}])]
    assert PartIndex(out, "other").entries == {} and index.missing([1, 4]) == [4]
    with open(path, "r+") as f:  # damage a line in the middle
        text = f.read()
        f.seek(0)
        f.write(text.replace('{"image":{"id":1,', '{"image":{"id":1', 1))  # an image line
    with pytest.raises(InputError, match="corrupt part file"):
        scan_part(path)


def test_changed_options_are_named():
    assert changed_options({"--a": 1, "--b": "x"}, {"--a": 2, "--b": "x", "--c": True}) == ["--a (1 → 2)", "--c (not set → True)"]
    assert changed_options({"--a": None}, {}) == ["--a (None → not set)"]
    assert changed_options({"weights": {"clip2sam": "ab"}}, {"weights": {"clip2sam": "cd"}}) == ["weights"]


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ovsam_model.labeling.parts import PartWriter
    w = PartWriter(Path(sys.argv[1]), "fp", {}, resume=False)
    w.append([{"image": {"id": 1}, "records": []}])
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    path = part_path(tmp_path / "out.json")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = path.read_bytes()
        with pytest.raises(InputError, match=rf"being written by another ovsam label run \(pid {holder.pid} on "):
            PartWriter(path, "fp-other", {}, resume=False)
        assert path.read_bytes() == before  # not truncated
    finally:
        holder.kill()
        holder.wait()
    w = PartWriter(path, "fp", {}, resume=True)  # the OS released the dead process's lock
    assert sorted(w.done) == [1]
    w.close()


_HOLD_WITH_WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ovsam_model.labeling.parts import PartWriter
    w = PartWriter(Path(sys.argv[1]), "fp", {}, resume=False)
    w.append([{"image": {"id": 1}, "records": []}])
    if os.fork() == 0:  # what a DataLoader worker is: forked after the writer took its lock
        print("worker", os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(0.5)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_killed_runs_lock_is_free_while_its_forked_workers_linger(tmp_path):
    """A run killed with SIGKILL leaves its DataLoader workers alive for a while: they must not
    hold its part file's lock, or an immediate --resume is refused naming the dead run."""
    import signal

    path = part_path(tmp_path / "out.json")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_WITH_WORKER, str(path)], stdout=subprocess.PIPE, text=True)
    lines = [holder.stdout.readline().split() for _ in range(2)]
    worker = int(next(line[1] for line in lines if line[0] == "worker"))
    try:
        assert ["locked"] in lines
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)  # the worker still runs
        w = PartWriter(path, "fp", {}, resume=True)
        assert sorted(w.done) == [1]
        w.append([{"image": {"id": 2}, "records": []}])
        w.close()
        assert sorted(scan_part(path).entries) == [1, 2]  # the worker never wrote into the file
    finally:
        os.kill(worker, signal.SIGKILL)


def _write(fmt, entries, tmp_path, categories=({"id": 1, "name": "x"},), name="o.json"):
    sink = get_format(fmt.split(":")[0], segmentation="polygons" if fmt.endswith(":polygons") else "rle")
    sink.begin(tmp_path / name, list(categories))
    for e in entries:
        sink.add(e)
    n = sink.end()
    return n, json.loads((tmp_path / name).read_text())


def test_results_and_dataset_formats(tmp_path):
    entries = [_entry(2, [{"image_id": 2, "k": 1, "segmentation": "s", "area": 1}, {"image_id": 2, "k": 2, "segmentation": "s", "area": 2}]),
               _entry(4, skipped=SkipReason.IMAGE_UNREADABLE),
               _entry(5, [{"image_id": 5, "k": 0, "segmentation": "s", "area": 3}]),
               _entry(6)]
    n, res = _write("results", entries, tmp_path)
    assert n == 3 and [(r["image_id"], r["k"]) for r in res] == [(2, 1), (2, 2), (5, 0)] and "area" not in res[0]
    n, ds = _write("dataset", entries, tmp_path)
    assert n == 3 and [a["id"] for a in ds["annotations"]] == [1, 2, 3] and all(a["iscrowd"] == 0 for a in ds["annotations"])
    assert [i["id"] for i in ds["images"]] == [2, 5, 6] and ds["annotations"][2]["area"] == 3  # the unreadable one is left out
    assert ds["categories"] == [{"id": 1, "name": "x"}]
    assert oct(os.stat(tmp_path / "o.json").st_mode & 0o777) != "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]  # no temp file left
    assert _write("results", [], tmp_path)[1] == []


def test_polygons_from_records(tmp_path):
    m = _masks(n=1, h=40, w=50)
    m[0] = False
    m[0, 5:20, 10:30] = True
    rle = encode_rle(m)[0]
    _, res = _write("results:polygons", [_entry(1, [{"image_id": 1, "segmentation": rle, "area": 300}])], tmp_path)
    polys = res[0]["segmentation"]
    assert polys == mask_polygons(rle) and isinstance(polys, list)
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 40, 50)))
    assert (back & m[0].numpy()).sum() / (back | m[0].numpy()).sum() > 0.85


def test_an_aborted_format_leaves_the_old_output(tmp_path):
    target = tmp_path / "o.json"
    target.write_text("[1]\n")
    sink = get_format("results")
    sink.begin(target, [])
    sink.add(_entry(1, [{"image_id": 1, "segmentation": "s"}]))
    sink.abort()
    assert target.read_text() == "[1]\n" and sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]
    with pytest.raises(ValueError, match="unknown output format 'yaml'"):
        get_format("yaml")


def test_skipped_entry_layout(tmp_path):
    assert skipped_entry(ImageRecord(7, tmp_path / "g.jpg", "g.jpg", 4, 6), SkipReason.IMAGE_UNREADABLE) == {
        "image": {"id": 7, "file_name": "g.jpg", "height": 4, "width": 6}, "records": [],
        "skipped": SkipReason.IMAGE_UNREADABLE}
