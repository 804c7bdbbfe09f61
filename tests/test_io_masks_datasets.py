"""Mask encodings, the dataset index and the image loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ovsam_model.io.datasets import load_image_source
from ovsam_model.io.detections import InputError, SkipReason
from ovsam_model.io.loader import make_loader
from ovsam_model.io.masks import encode_rle, mask_polygons, rle_area, rle_bbox
from ovsam_model.types import PreparedImage


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


