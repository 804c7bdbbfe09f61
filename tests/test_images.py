"""Image decoding that must never go silently wrong: bit depth, float images, EXIF frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ovsam_model.io.datasets import ImageRecord, load_image_source
from ovsam_model.io.detections import InputError, SkipReason
from ovsam_model.io.images import (
    FloatImageError,
    ImageSizeMismatch,
    apply_orientation,
    read_header,
    read_image,
)
from ovsam_model.io.loader import make_loader, read_rgb
from ovsam_model.types import PreparedImage

cv2 = pytest.importorskip("cv2")  # installed with lvis; writes 16-bit colour PNGs


@pytest.fixture(scope="module")
def coco_rgb(data_dir: Path) -> np.ndarray:
    """A real COCO val2017 image, H×W×3 uint8 (480×640, landscape)."""
    images = data_dir / "coco-val2017-mini" / "images"
    if not images.is_dir():
        pytest.skip(f"no COCO images in {images}")
    with Image.open(sorted(images.glob("*.jpg"))[0]) as im:
        array = np.array(im.convert("RGB"))
    assert array.shape[0] != array.shape[1]
    return array


def _prepare(array: np.ndarray) -> PreparedImage:
    pixels = torch.from_numpy(array).permute(2, 0, 1).float()
    return PreparedImage(pixels=pixels, original_size=tuple(array.shape[:2]), input_size=tuple(array.shape[:2]))


def _load_one(path: Path, hw: tuple[int, int], exif: str = "auto"):
    record = ImageRecord(1, path, path.name, hw[0], hw[1])
    (batch,) = list(make_loader([record], _prepare, batch_size=1, workers=0, exif=exif))
    return batch[0]


# ---------------------------------------------------------------- bit depth


def test_16bit_grey_png_made_as_v257_decodes_to_the_8bit_pixels(coco_rgb, tmp_path):
    grey = coco_rgb[:, :, 1]
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # really a 16-bit PNG, not re-encoded as 8-bit
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (*grey.shape, 3)
    assert np.array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    item = _load_one(path, grey.shape)
    assert item.error is None and torch.equal(item.prepared.pixels, torch.from_numpy(out).permute(2, 0, 1).float())


def test_16bit_rgb_png_made_as_v257_decodes_to_the_8bit_pixels(coco_rgb, tmp_path):
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), (coco_rgb.astype(np.uint16) * 257)[:, :, ::-1])
    assert np.array_equal(read_rgb(path), coco_rgb)


def test_16bit_rgb_png_scales_by_round_v_over_257(coco_rgb, tmp_path):
    """Arbitrary 16-bit samples: round(v / 257), not PIL's high byte floor(v / 256)."""
    rng = np.random.default_rng(0)
    deep = np.clip(coco_rgb.astype(np.int64) * 257 + rng.integers(-128, 129, coco_rgb.shape), 0, 65535).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), deep[:, :, ::-1])
    expected = np.round(deep / 257).astype(np.uint8)
    assert not np.array_equal(expected, (deep >> 8).astype(np.uint8))  # the two rules differ here
    assert np.array_equal(read_rgb(path), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_12bit_data_in_16bit_png_is_not_saturated(coco_rgb, tmp_path, channels):
    deep = coco_rgb.astype(np.uint16) * 16 + 15  # 0..4095, as a 12-bit sensor writes it
    deep = deep[:, :, 0] if channels == 1 else deep
    path = tmp_path / "12bit.png"
    if channels == 1:
        Image.fromarray(deep).save(path)
    else:
        assert cv2.imwrite(str(path), deep[:, :, ::-1])
    out = read_rgb(path)
    assert out.max() <= 16 and out.mean() < 20  # the full 16-bit range: 4095 → 16, never white
    expected = np.round(deep / 257).astype(np.uint8)
    assert np.array_equal(out, expected if channels == 3 else np.repeat(expected[:, :, None], 3, axis=2))
    assert 0 < (out > 0).mean()  # not crushed to black either


def test_float_tiff_is_skipped_with_its_reason(coco_rgb, tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(coco_rgb[:, :, 0].astype(np.float32) / 255).save(path)
    with Image.open(path) as im:
        assert im.mode == "F"
    message = "float image (mode F): convert it to 8 or 16 bits first"
    with pytest.raises(FloatImageError, match=r"^float image \(mode F\): convert it to 8 or 16 bits first$"):
        read_rgb(path)
    item = _load_one(path, coco_rgb.shape[:2])
    assert item.prepared is None and item.error == message and item.reason == SkipReason.IMAGE_FLOAT  # not "corrupt"


def test_float_rgb_tiff_and_hdr_are_skipped_not_called_corrupt(coco_rgb, tmp_path):
    data = coco_rgb[:, :, ::-1].astype(np.float32) / 255
    for name, what in (("f.tif", "32-bit float TIFF, 3 channels"), ("f.hdr", "Radiance HDR")):
        assert cv2.imwrite(str(tmp_path / name), data)
        item = _load_one(tmp_path / name, coco_rgb.shape[:2])
        assert item.error == f"float image ({what}): convert it to 8 or 16 bits first"
        assert item.reason == SkipReason.IMAGE_FLOAT


def test_8bit_modes_still_convert_as_pil_does(coco_rgb, tmp_path):
    rgba = np.dstack([coco_rgb, np.full(coco_rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(coco_rgb).convert("P").save(tmp_path / "p.png")
    assert np.array_equal(read_rgb(tmp_path / "rgba.png"), coco_rgb)
    with Image.open(tmp_path / "p.png") as im:
        assert np.array_equal(read_rgb(tmp_path / "p.png"), np.array(im.convert("RGB")))


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_exif_transpose(coco_rgb, tmp_path, orientation):
    crop = coco_rgb[:37, :53]
    im = Image.fromarray(crop)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as im:
        expected = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(apply_orientation(crop, orientation), expected)
    assert np.array_equal(read_image(tmp_path / "o.png", exif="apply").array, expected)
    assert np.array_equal(read_image(tmp_path / "o.png", exif="ignore").array, crop)


def _jpeg_with_orientation(array: np.ndarray, path: Path, orientation: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Store `array` turned 90° counter-clockwise with tag 6, so that exif_transpose gives back
    `array`'s frame. Returns (stored pixels, exif_transpose pixels) of the file as decoded by PIL."""
    im = Image.fromarray(array).rotate(90, expand=True) if orientation == 6 else Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        raw = np.array(im.convert("RGB"))
        rotated = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    return raw, rotated


def test_exif_auto_chooses_the_frame_that_matches_ann(coco_rgb, tmp_path):
    path = tmp_path / "rot.jpg"
    raw, rotated = _jpeg_with_orientation(coco_rgb, path)
    h, w = coco_rgb.shape[:2]
    assert raw.shape[:2] == (w, h) and rotated.shape[:2] == (h, w) and not np.array_equal(raw.T, rotated.T)
    header = read_header(path)
    assert (header.width, header.height, header.orientation) == (h, w, 6)

    item = _load_one(path, (h, w))  # --ann says the EXIF-rotated size
    assert item.error is None and item.exif_applied and item.orientation == 6
    assert item.prepared.original_size == (h, w)
    assert torch.equal(item.prepared.pixels, torch.from_numpy(rotated).permute(2, 0, 1).float())

    item = _load_one(path, (w, h))  # --ann says the stored size
    assert item.error is None and not item.exif_applied
    assert item.prepared.original_size == (w, h)
    assert torch.equal(item.prepared.pixels, torch.from_numpy(raw).permute(2, 0, 1).float())

    item = _load_one(path, (500, 500))  # neither
    assert item.prepared is None and item.reason == SkipReason.IMAGE_SIZE_MISMATCH
    assert item.error == f"decoded {h}×{w} stored, {w}×{h} with EXIF orientation 6 applied; neither is 500×500 in --ann"


def test_exif_apply_and_ignore_force_the_frame(coco_rgb, tmp_path):
    path = tmp_path / "rot.jpg"
    raw, rotated = _jpeg_with_orientation(coco_rgb, path)
    h, w = coco_rgb.shape[:2]
    assert np.array_equal(read_image(path, exif="apply").array, rotated)
    assert np.array_equal(read_image(path, exif="ignore").array, raw)
    assert np.array_equal(read_image(path, exif="apply", expected_hw=(h, w)).array, rotated)
    assert np.array_equal(read_image(path, exif="ignore", expected_hw=(w, h)).array, raw)

    item = _load_one(path, (w, h), exif="apply")  # --ann has the stored size
    assert item.reason == SkipReason.IMAGE_SIZE_MISMATCH
    assert item.error == f"decoded {w}×{h} (EXIF orientation 6 applied; {h}×{w} stored) != {h}×{w} in --ann; try --exif ignore (or auto)"
    item = _load_one(path, (h, w), exif="ignore")  # --ann has the rotated size
    assert item.reason == SkipReason.IMAGE_SIZE_MISMATCH
    assert item.error == (f"decoded {h}×{w} (stored layout; EXIF orientation 6 ignored, {w}×{h} with it) "
                          f"!= {w}×{h} in --ann; try --exif auto (or apply)")
    item = _load_one(path, (w, h), exif="ignore")
    assert item.error is None and item.prepared.original_size == (w, h) and not item.exif_applied

    with pytest.raises(ValueError, match="auto, apply, ignore"):
        make_loader([], _prepare, exif="rotate")


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_auto_applies_when_both_frames_match(coco_rgb, tmp_path, orientation):
    """Square image (any tag) or a tag without a 90° turn: the detector's frame."""
    side = min(coco_rgb.shape[:2])
    square = coco_rgb[:side, :side] if orientation == 6 else coco_rgb
    path = tmp_path / "both.jpg"
    square_img = Image.fromarray(square)
    exif = square_img.getexif()
    exif[0x0112] = orientation
    square_img.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        raw, rotated = np.array(im.convert("RGB")), np.array(ImageOps.exif_transpose(im).convert("RGB"))
    assert raw.shape == rotated.shape and not np.array_equal(raw, rotated)
    item = _load_one(path, raw.shape[:2])
    assert item.exif_applied and torch.equal(item.prepared.pixels, torch.from_numpy(rotated).permute(2, 0, 1).float())


def test_size_mismatch_without_exif_names_both_sizes(coco_rgb, tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(coco_rgb).save(path)
    h, w = coco_rgb.shape[:2]
    item = _load_one(path, (h + 1, w))
    assert item.error == f"decoded {w}×{h} != {w}×{h + 1} in --ann" and item.reason == SkipReason.IMAGE_SIZE_MISMATCH
    with pytest.raises(ImageSizeMismatch):
        read_image(path, expected_hw=(h + 1, w))


def test_folder_mode_sizes_and_pixels_are_in_the_exif_frame(coco_rgb, tmp_path):
    raw, rotated = _jpeg_with_orientation(coco_rgb, tmp_path / "000000000042.jpg")
    h, w = coco_rgb.shape[:2]
    source = load_image_source(tmp_path)  # no --ann: auto = apply
    assert source.size(42) == (h, w)
    (batch,) = list(make_loader([source.get(42)], _prepare, workers=0, exif=source.exif))
    assert batch[0].prepared.original_size == (h, w) and batch[0].exif_applied
    assert torch.equal(batch[0].prepared.pixels, torch.from_numpy(rotated).permute(2, 0, 1).float())
    assert load_image_source(tmp_path, exif="apply").size(42) == (h, w)
    stored = load_image_source(tmp_path, exif="ignore")
    assert stored.size(42) == (w, h)
    (batch,) = list(make_loader([stored.get(42)], _prepare, workers=0, exif="ignore"))
    assert batch[0].prepared.original_size == (w, h)
    assert torch.equal(batch[0].prepared.pixels, torch.from_numpy(raw).permute(2, 0, 1).float())
    with pytest.raises(InputError, match="--exif"):
        load_image_source(tmp_path, exif="yes")


def test_ann_mode_keeps_json_sizes_and_passes_the_policy(coco_rgb, tmp_path):
    _jpeg_with_orientation(coco_rgb, tmp_path / "a.jpg")
    h, w = coco_rgb.shape[:2]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w}],
                               "categories": [{"id": 1, "name": "x"}]}))
    source = load_image_source(tmp_path, ann, exif="ignore")
    assert source.size(1) == (h, w) and source.exif == "ignore"
    (batch,) = list(make_loader([source.get(1)], _prepare, workers=0, exif=source.exif))
    assert batch[0].reason == SkipReason.IMAGE_SIZE_MISMATCH and "try --exif auto" in batch[0].error


def test_size_mismatch_messages_for_every_policy():
    from ovsam_model.io.images import ImageHeader, size_mismatch_message

    plain, turned, flipped = ImageHeader(640, 480), ImageHeader(480, 640, 6), ImageHeader(640, 480, 3)
    assert size_mismatch_message(plain, "auto", (640, 480)) == (
        "decoded 640×480 != 480×640 in --ann (turned by 90°, and the file has no EXIF orientation tag)")
    assert size_mismatch_message(turned, "apply", (500, 400)) == "decoded 640×480 (EXIF orientation 6 applied; 480×640 stored) != 400×500 in --ann"
    assert size_mismatch_message(turned, "ignore", (500, 400)) == "decoded 480×640 (stored layout; EXIF orientation 6 ignored) != 400×500 in --ann"
    assert size_mismatch_message(flipped, "apply", (500, 400)) == "decoded 640×480 (EXIF orientation 3 applied, no size change) != 400×500 in --ann"
    assert size_mismatch_message(flipped, "ignore", (500, 400)) == (
        "decoded 640×480 (stored layout; EXIF orientation 3 ignored, no size change) != 400×500 in --ann")
    assert size_mismatch_message(flipped, "auto", (500, 400)) == "decoded 640×480 (EXIF orientation 3, no size change) != 400×500 in --ann"
