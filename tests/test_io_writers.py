"""Mask encodings, records, part files, dataset index and the image loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ovsam_model.io.datasets import ImageRecord, load_image_source
from ovsam_model.io.detections import InputError, PromptRecord, SkipReason
from ovsam_model.io.loader import make_loader
from ovsam_model.io.masks import encode_rle, mask_polygons, rle_area, rle_bbox
from ovsam_model.io.writers import (
    PartWriter,
    assemble,
    build_records,
    part_path,
    read_done,
    read_part,
    skipped_entry,
    write_json_atomic,
)
from ovsam_model.types import PreparedImage, Prediction


def _masks(n=3, h=17, w=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) > 0.6
    m[-1] = False  # one empty mask
    return m


def test_rle_matches_pycocotools_reference():
    m = _masks()
    rles = encode_rle(m)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    for i, rle in enumerate(rles):
        ref = mask_utils.encode(np.asfortranarray(m[i].numpy().astype(np.uint8)))
        assert rle["counts"] == ref["counts"].decode()
        assert np.array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), m[i].numpy())
    assert rle_area(rles) == [int(x) for x in m.sum((1, 2))]
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    assert rle_bbox(rles)[0] == [xs.min().item(), ys.min().item(), xs.max().item() - xs.min().item() + 1, ys.max().item() - ys.min().item() + 1]
    assert rle_bbox(rles)[2] == [0, 0, 0, 0]
    assert encode_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []
    with pytest.raises(TypeError):
        encode_rle(m.float())


def test_polygons_cover_the_mask():
    m = torch.zeros(40, 50, dtype=torch.bool)
    m[5:20, 10:30] = True
    m[25:35, 35:45] = True
    polys = mask_polygons(m)
    assert len(polys) == 2 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, 40, 50))
    # polygons through pixel centres lose at most the outer half-pixel ring
    iou = mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))], [0])[0][0]
    assert iou > 0.85
    assert mask_polygons(torch.zeros(8, 8, dtype=torch.bool)) == []


def _image(tmp_path, iid=7, h=17, w=23):
    from ovsam_model.io.datasets import ImageRecord

    return ImageRecord(iid, tmp_path / "x.jpg", "x.jpg", h, w)


def _prediction(m):
    n = m.shape[0]
    return Prediction(
        masks=m,
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
    assert all(r["detector_score"] == 0.8 and r["detector_category_id"] == 18 for r in recs)
    det = build_records(_image(tmp_path), prompts, _prediction(m), category_ids=[10, 20, 30], label_source="detector")
    assert [(r["category_id"], r["score"]) for r in det] == [(18, 0.8)] * 3
    with pytest.raises(ValueError, match="masks"):
        build_records(_image(tmp_path, h=5), prompts, _prediction(m), category_ids=[10, 20, 30])


def test_part_file_resume_ignores_torn_line(tmp_path):
    out = tmp_path / "out.json"
    path = part_path(out)
    w = PartWriter(path, "fp1", resume=False)
    w.append([{"image": {"id": 3}, "records": [{"a": 1}]}, {"image": {"id": 1}, "records": []}])
    w.close()
    with open(path, "a") as f:
        f.write('{"image": {"id": 9}, "reco')  # killed mid-write
    contents = read_part(path)
    assert sorted(contents.entries) == [1, 3] and contents.fingerprint == "fp1"
    w = PartWriter(path, "fp1", resume=True)
    assert sorted(w.done) == [1, 3]
    w.append([{"image": {"id": 9}, "records": [{"b": 2}]}])
    w.finish(world=1)
    again = read_part(path)
    assert sorted(again.entries) == [1, 3, 9] and again.done_worlds == {1}
    with pytest.raises(InputError, match="other inputs"):
        PartWriter(path, "fp2", resume=True)
    assert sorted(read_done(out, "fp1")) == [1, 3, 9] and read_done(out, "other") == {}
    with open(path, "r+") as f:  # damage a line in the middle
        text = f.read()
        f.seek(0)
        f.write(text.replace('{"image":{"id":1}', '{"image":{"id":1', 1))
    with pytest.raises(InputError, match="corrupt part file"):
        read_part(path)


def test_assemble_sorts_and_dataset_format(tmp_path):
    entries = [
        {"image": {"id": 5, "file_name": "b.jpg", "height": 2, "width": 2}, "records": [{"image_id": 5, "k": 0, "area": 3}]},
        {"image": {"id": 2, "file_name": "a.jpg", "height": 2, "width": 2}, "records": [{"image_id": 2, "k": 1, "area": 1}, {"image_id": 2, "k": 2, "area": 2}]},
    ]
    res = assemble(entries)
    assert [(r["image_id"], r["k"]) for r in res] == [(2, 1), (2, 2), (5, 0)] and "area" not in res[0]
    ds = assemble(entries, fmt="dataset", categories=[{"id": 1, "name": "x"}])
    assert [a["id"] for a in ds["annotations"]] == [1, 2, 3] and all(a["iscrowd"] == 0 for a in ds["annotations"])
    assert [i["id"] for i in ds["images"]] == [2, 5] and ds["annotations"][2]["area"] == 3
    target = tmp_path / "o.json"
    write_json_atomic(target, res)
    assert json.loads(target.read_text()) == res and oct(os.stat(target).st_mode & 0o777) != "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]


def test_image_source_coco_lvis_and_folder(tmp_path):
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "000000000005.jpg")
    Image.new("RGB", (30, 20)).save(tmp_path / "val2017" / "000000000006.jpg")
    lvis = {"images": [{"id": 5, "height": 20, "width": 30, "coco_url": "http://x/val2017/000000000005.jpg"},
                       {"id": 6, "height": 20, "width": 30, "coco_url": "http://x/val2017/000000000006.jpg"}],
            "categories": [{"id": 3, "name": "c"}, {"id": 1, "name": "a"}]}
    ann = tmp_path / "lvis.json"
    ann.write_text(json.dumps(lvis))
    src = load_image_source(tmp_path, ann)
    assert src.kind == "lvis" and src.category_ids == [1, 3]
    assert src.get(5).path == tmp_path / "000000000005.jpg"
    assert src.get(6).path == tmp_path / "val2017" / "000000000006.jpg"
    assert src.get(7) is None and src.missing_reason(7) == SkipReason.IMAGE_NOT_IN_ANN
    folder = load_image_source(tmp_path)
    assert folder.size(5) == (20, 30) and folder.get(6) is None and folder.missing_reason(6) == SkipReason.IMAGE_UNREADABLE
    with pytest.raises(InputError, match="no such directory"):
        load_image_source(tmp_path / "nope")
    ann.write_text('{"images": [}')
    with pytest.raises(InputError, match="line 1 column"):
        load_image_source(tmp_path, ann)


def test_loader_marks_bad_images(tmp_path):
    from ovsam_model.io.datasets import ImageRecord

    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    images = [ImageRecord(1, tmp_path / "ok.png", "ok.png", 20, 30), ImageRecord(2, tmp_path / "bad.jpg", "bad.jpg", 20, 30),
              ImageRecord(3, tmp_path / "gone.jpg", "gone.jpg", 20, 30), ImageRecord(4, tmp_path / "ok.png", "ok.png", 21, 30)]

    def prepare(arr):
        return PreparedImage(torch.from_numpy(arr).permute(2, 0, 1).float(), arr.shape[:2], arr.shape[:2])

    batches = list(make_loader(images, prepare, batch_size=3, workers=0))
    assert [len(b) for b in batches] == [3, 1]
    items = [it for b in batches for it in b]
    assert items[0].prepared.pixels[0, 0, 0] == 255 and items[0].prepared.original_size == (20, 30)
    assert [it.reason for it in items] == [None, SkipReason.IMAGE_UNREADABLE, SkipReason.IMAGE_UNREADABLE, SkipReason.IMAGE_SIZE_MISMATCH]


def test_rle_area_and_bbox_for_300_masks():
    """300 masks per image (the default --max-dets): pycocotools' list call overflows at 256."""
    import torch
    from pycocotools import mask as mask_utils

    from ovsam_model.io.masks import encode_rle, rle_area, rle_bbox

    masks = torch.zeros(300, 20, 30, dtype=torch.bool)
    for i in range(300):
        masks[i, i % 20 :, : 1 + i % 30] = True
    rles = encode_rle(masks)
    assert rle_area(rles) == masks.flatten(1).sum(1).tolist()
    assert rle_bbox(rles)[7] == [float(v) for v in mask_utils.toBbox(rles[7])]


def test_skipped_images_are_done_but_not_listed(tmp_path):
    """An unreadable image is a finished part-file entry (resume skips it) with no records; a
    dataset leaves it out of `images` but lists an image whose detections were all filtered."""
    unreadable = skipped_entry(ImageRecord(7, tmp_path / "g.jpg", "g.jpg", 4, 6), SkipReason.IMAGE_UNREADABLE)
    assert unreadable == {"image": {"id": 7, "file_name": "g.jpg", "height": 4, "width": 6}, "records": [],
                          "skipped": SkipReason.IMAGE_UNREADABLE}
    empty = {"image": {"id": 3, "file_name": "e.jpg", "height": 2, "width": 2}, "records": []}
    full = {"image": {"id": 5, "file_name": "f.jpg", "height": 2, "width": 2}, "records": [{"image_id": 5, "area": 1}]}
    out = tmp_path / "out.json"
    w = PartWriter(part_path(out), "fp", resume=False)
    w.append([unreadable, empty, full])
    w.finish(world=1)
    done = read_done(out, "fp")
    assert sorted(done) == [3, 5, 7] and done[7]["skipped"] == SkipReason.IMAGE_UNREADABLE
    assert sorted(PartWriter(part_path(out), "fp", resume=True).done) == [3, 5, 7]
    ds = assemble(done.values(), fmt="dataset")
    assert [i["id"] for i in ds["images"]] == [3, 5] and [a["image_id"] for a in ds["annotations"]] == [5]
    assert assemble(done.values()) == [{"image_id": 5}]
