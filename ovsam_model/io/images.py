"""Decode an image file into the H×W×3 uint8 RGB array the model sees, in a well-defined frame.

Pixel values (never silently saturated, never guessed):

* 8-bit images: palette, 1-bit, L, LA, RGBA, CMYK, YCbCr, ... go through PIL's normal
  conversion to RGB (alpha is dropped, not composited).
* Integer images with more than 8 bits per channel are scaled to 8 bits by the full range of
  their stored integer type: out = round((v - min) * 255 / (max - min)), with (min, max) the
  limits of the type. For unsigned 16-bit data this is round(v / 257), so an 8-bit image stored
  in 16 bits as v * 257 decodes back to exactly its 8-bit pixels, and a 12-bit image (values up
  to 4095) comes out dark (≤ 16), not white. Signed types map their minimum to 0. Grey becomes
  RGB by repetition. This covers 16-bit grey PNG/TIFF/PGM (PIL modes I;16, I;16B, I;16L, I;16N,
  I;16S), 32-bit integer TIFF (mode I; its depth is taken from the decoder's raw mode), and
  16-bit RGB/RGBA/LA PNG and TIFF: PIL opens those as 8-bit RGB/RGBA/LA keeping only each
  sample's high byte (floor(v / 256)), so their 16-bit samples are read with OpenCV (a
  dependency of `lvis`) and scaled as above; only if OpenCV is missing or cannot read the file
  does PIL's high-byte result stand (at most 1 away from the rule, never saturated). 16-bit PPM
  is left to PIL, which already scales it as round(v * 255 / maxval).
* Float images (PIL mode F: 32-bit or 16-bit float TIFF; float RGB TIFF; Radiance HDR;
  OpenEXR) have no defined white: they raise `FloatImageError`, e.g. "float image (mode F):
  convert it to 8 or 16 bits first", and the labeling run skips the image with that reason.

Frame (EXIF orientation; `exif` policy, one of EXIF_POLICIES):

* "ignore": the pixel layout as stored in the file.
* "apply": the frame of `PIL.ImageOps.exif_transpose` (what detectron2, Detic and ultralytics
  feed their detectors).
* "auto": with the dataset JSON's size of the image (`expected_hw`, from --ann) the frame is
  chosen per image: only the stored size matches → stored; only the EXIF-rotated size matches →
  rotated; both match (an orientation without a 90° turn, or a square image) → EXIF applied
  (the detector's frame); neither → `ImageSizeMismatch`. Without a dataset JSON, "auto" is
  "apply".

With "ignore"/"apply" and an `expected_hw`, a size that differs raises `ImageSizeMismatch` too.
Its message names both sizes as W×H and says what EXIF did or would do, e.g.
"decoded 480×640 (EXIF orientation 6 applied; 640×480 stored) != 640×480 in --ann; try --exif
ignore (or auto)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from ovsam_model.io.uris import is_uri

EXIF_POLICIES = ("auto", "apply", "ignore")
ORIENTATION_TAG = 0x0112  # EXIF / TIFF Orientation
TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height

PathLike = Union[str, Path]
Source = Union[str, Path, bytes]  # a local path, or the bytes of a file read from a URI


class FloatImageError(ValueError):
    """A floating-point image: no scale to 8 bits is defined, so it is not guessed."""


class ImageSizeMismatch(ValueError):
    """The image's size in the chosen frame differs from the dataset JSON's (message says how)."""


def float_image_message(what: str) -> str:
    return f"float image ({what}): convert it to 8 or 16 bits first"


def check_exif_policy(exif: str) -> str:
    """`exif` itself, or ValueError naming the choices."""
    if exif not in EXIF_POLICIES:
        raise ValueError(f"exif policy must be one of {', '.join(EXIF_POLICIES)}, got {exif!r}")
    return exif


# ---------------------------------------------------------------- header and frame


@dataclass(frozen=True)
class ImageHeader:
    """What the file's header says: the stored size and the EXIF orientation (1 = none, 1..8)."""

    width: int
    height: int
    orientation: int = 1
    mode: str = ""

    @property
    def transposed(self) -> bool:
        """Whether applying the orientation swaps width and height."""
        return self.orientation in TRANSPOSING

    def size(self, apply_exif: bool) -> tuple[int, int]:
        """(width, height) in the stored frame, or with the EXIF orientation applied."""
        if apply_exif and self.transposed:
            return self.height, self.width
        return self.width, self.height

    def hw(self, apply_exif: bool) -> tuple[int, int]:
        """(height, width) in that frame (the order of `ImageRecord` and array shapes)."""
        w, h = self.size(apply_exif)
        return h, w


def exif_orientation(im: Image.Image) -> int:
    """The EXIF/TIFF orientation tag, 1 when absent or not one of 1..8 (as exif_transpose)."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not make the pixels unreadable
        return 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def header_of(im: Image.Image) -> ImageHeader:
    width, height = im.size
    return ImageHeader(int(width), int(height), exif_orientation(im), im.mode)


def read_header(path: PathLike) -> ImageHeader:
    """The header of an image file (no pixel decoding for JPEG). Raises FileNotFoundError,
    OSError (not an image), ValueError, Image.DecompressionBombError like `Image.open`. A URI
    (`ovsam_model.io.uris`) is read a block at a time, as far as the header goes."""
    if is_uri(path):
        from ovsam_model.io.uris import open_header

        with open_header(str(path)) as f, Image.open(f) as im:
            return header_of(im)
    with Image.open(path) as im:
        return header_of(im)


def _wh(w: int, h: int) -> str:
    return f"{w}×{h}"


def choose_frame(header: ImageHeader, exif: str = "auto", expected_hw: Optional[tuple[int, int]] = None) -> bool:
    """Whether to apply the EXIF orientation, by the module's rules; raises ImageSizeMismatch when
    `expected_hw` (height, width from --ann) fits no allowed frame."""
    check_exif_policy(exif)
    if expected_hw is None:
        return exif != "ignore"
    expected = (int(expected_hw[1]), int(expected_hw[0]))  # (W, H)
    raw, rotated = header.size(False), header.size(True)
    if exif == "auto":
        if rotated == expected:
            return True  # also when both match: the detector's frame
        if raw == expected:
            return False
    elif exif == "apply" and rotated == expected:
        return True
    elif exif == "ignore" and raw == expected:
        return False
    raise ImageSizeMismatch(size_mismatch_message(header, exif, expected_hw))


def size_mismatch_message(header: ImageHeader, exif: str, expected_hw: tuple[int, int]) -> str:
    """Why `header` does not fit `expected_hw` under policy `exif`: both sizes as W×H, plus what
    EXIF did or would have done and which --exif choice would fit."""
    ew, eh = int(expected_hw[1]), int(expected_hw[0])
    want = f"{_wh(ew, eh)} in --ann"
    raw, rotated = header.size(False), header.size(True)
    o = header.orientation
    if o == 1:
        if raw == (eh, ew) and ew != eh:
            return f"decoded {_wh(*raw)} != {want} (turned by 90°, and the file has no EXIF orientation tag)"
        return f"decoded {_wh(*raw)} != {want}"
    turn = "" if header.transposed else ", no size change"
    if exif == "apply":
        if not header.transposed:
            return f"decoded {_wh(*raw)} (EXIF orientation {o} applied, no size change) != {want}"
        hint = "; try --exif ignore (or auto)" if raw == (ew, eh) else ""
        return f"decoded {_wh(*rotated)} (EXIF orientation {o} applied; {_wh(*raw)} stored) != {want}{hint}"
    if exif == "ignore":
        if rotated == (ew, eh):
            return (f"decoded {_wh(*raw)} (stored layout; EXIF orientation {o} ignored, {_wh(*rotated)} with it) "
                    f"!= {want}; try --exif auto (or apply)")
        return f"decoded {_wh(*raw)} (stored layout; EXIF orientation {o} ignored{turn}) != {want}"
    if header.transposed:
        return f"decoded {_wh(*raw)} stored, {_wh(*rotated)} with EXIF orientation {o} applied; neither is {want}"
    return f"decoded {_wh(*raw)} (EXIF orientation {o}{turn}) != {want}"


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """`array` (H×W or H×W×C) as `PIL.ImageOps.exif_transpose` would turn it; a writable,
    contiguous copy."""
    a = array
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = np.rot90(a, -1)
    elif orientation == 7:
        a = a[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        a = np.rot90(a, 1)
    return np.array(a, order="C")  # always a copy


# ---------------------------------------------------------------- pixel values


def _rawmode(im: Image.Image) -> str:
    """The decoder's raw mode of the first tile ("RGB;16B", "I;32S", ...), "" if unknown."""
    tile = getattr(im, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def _int_range(im: Image.Image, rawmode: str) -> tuple[int, int]:
    """(min, max) of the stored integer type of a PIL mode I / I;16* image."""
    mode = im.mode
    if mode.startswith("I;16"):
        return (-(2**15), 2**15 - 1) if mode.endswith("S") else (0, 2**16 - 1)
    # mode "I" holds int32 whatever the file stores (8, 16 or 32 bits): the raw mode says which
    m = re.match(r"I;(8|16|32)(S?)", rawmode)
    bits, signed = (32, True) if m is None else (int(m.group(1)), m.group(2) == "S")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _rounded_ratio(v: np.ndarray, span: int) -> np.ndarray:
    """round(v * 255 / span) for 0 <= v <= span as uint8 (round half up, exact integers)."""
    return ((v.astype(np.int64) * 510 + span) // (2 * span)).astype(np.uint8)


_LUT16 = _rounded_ratio(np.arange(65536), 65535)  # round(v / 257)


def _scale_to_u8(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round((v - lo) * 255 / (hi - lo)) as uint8: for 16-bit unsigned data round(v / 257)
    (which never ties), through a lookup table for 16-bit types (no int64 copy of the image)."""
    span = hi - lo
    if lo == 0 and span == 65535 and values.dtype == np.uint16:
        return _LUT16[values]
    shifted = np.clip(values.astype(np.int64) - lo, 0, span)
    if span <= 65535:
        return _rounded_ratio(np.arange(span + 1), span)[shifted]
    return _rounded_ratio(shifted, span)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _file_bytes(source: Source) -> np.ndarray:
    """The file's bytes as uint8 (a local path is read; bytes of a URI's object are viewed)."""
    if isinstance(source, (bytes, bytearray)):
        return np.frombuffer(source, dtype=np.uint8)
    return np.fromfile(str(source), dtype=np.uint8)


def _read_deep_color(path: Source, size: tuple[int, int]) -> Optional[np.ndarray]:
    """A 16-bit RGB/RGBA/LA file's samples through OpenCV (stored layout), as H×W×3 uint16 RGB;
    None when OpenCV is missing or does not give 16-bit samples of the expected size."""
    try:
        import cv2
    except ImportError:
        return None
    try:
        data = _file_bytes(path)
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF rotation, depth kept
    except Exception:
        return None
    if array is None or array.dtype != np.uint16 or array.shape[:2] != (size[1], size[0]):
        return None
    if array.ndim == 2:
        return _grey_to_rgb(array)
    if array.shape[2] == 2:  # grey + alpha
        return _grey_to_rgb(array[:, :, 0])
    if array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, 2::-1])  # BGR(A) → RGB, alpha dropped
    return None


def to_rgb8(im: Image.Image, path: Optional[Source] = None, rawmode: Optional[str] = None) -> np.ndarray:
    """The H×W×3 uint8 RGB pixels of an opened image, stored layout (no EXIF), by the rules of
    the module docstring. `path` (or the file's bytes) lets 16-bit colour files be re-read at full depth; `rawmode`:
    the decoder's raw mode as read before anything loaded the image (loading clears it; default:
    read it now). Raises FloatImageError for float images."""
    mode = im.mode
    if rawmode is None:
        rawmode = _rawmode(im)
    if mode == "F" or mode.startswith("F;"):
        raise FloatImageError(float_image_message(f"mode {mode}"))
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 3 in tuple(np.atleast_1d(tags.get(339, 1))):
        raise FloatImageError(float_image_message(f"float TIFF, mode {mode}"))
    if mode == "I" or mode.startswith("I;"):
        lo, hi = _int_range(im, rawmode)
        values = np.asarray(im)
        if (lo, hi) == (0, 2**32 - 1) and values.dtype == np.int32:
            values = values.view(np.uint32)  # unsigned 32-bit samples held bit for bit in mode I
        return _grey_to_rgb(_scale_to_u8(values, lo, hi))
    if mode in ("RGB", "RGBA", "LA") and ";16" in rawmode and path is not None:
        deep = _read_deep_color(path, im.size)
        if deep is not None:
            return _scale_to_u8(deep, 0, 65535)
    return np.array(im.convert("RGB"))  # writable copy (torch.from_numpy warns on read-only)


_FLOAT_MAGIC = ((b"#?RADIANCE", "Radiance HDR"), (b"#?RGBE", "Radiance HDR"), (b"\x76\x2f\x31\x01", "OpenEXR"))


def sniff_float_image(path: Source) -> Optional[str]:
    """For a file PIL cannot open (a local path, or the file's bytes): the float-image message if
    it is one (Radiance HDR, OpenEXR, or a float TIFF that OpenCV decodes to float samples), else None."""
    if isinstance(path, (bytes, bytearray)):
        head = bytes(path[:16])
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError:
            return None
    for magic, what in _FLOAT_MAGIC:
        if head.startswith(magic):
            return float_image_message(what)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            import cv2

            array = cv2.imdecode(_file_bytes(path), cv2.IMREAD_UNCHANGED)
        except Exception:
            return None
        if array is not None and array.dtype.kind == "f":
            channels = 1 if array.ndim == 2 else array.shape[2]
            return float_image_message(f"{array.dtype.itemsize * 8}-bit float TIFF, {channels} channels")
    return None


# ---------------------------------------------------------------- whole decode


@dataclass
class DecodedImage:
    """`array`: H×W×3 uint8 RGB in the chosen frame; `exif_applied`: whether that frame is the
    EXIF-rotated one; `header`: the stored size and orientation."""

    array: np.ndarray
    header: ImageHeader
    exif_applied: bool

    @property
    def orientation(self) -> int:
        return self.header.orientation


def read_image(path: PathLike, *, exif: str = "auto", expected_hw: Optional[tuple[int, int]] = None) -> DecodedImage:
    """Decode `path` in the frame chosen by `exif` (and `expected_hw`, the (height, width) from
    --ann). Raises FileNotFoundError, ImageSizeMismatch (before decoding the pixels),
    FloatImageError, or OSError/ValueError/Image.DecompressionBombError for an unreadable file.
    `path`: a local path, or a URI (`ovsam_model.io.uris`), whose object is read whole first."""
    check_exif_policy(exif)
    source: Source = path
    opened: object = path
    if is_uri(path):
        from ovsam_model.io.uris import NamedBytes, read_bytes

        source = read_bytes(str(path))
        opened = NamedBytes(source, str(path))
    try:
        im = Image.open(opened)  # type: ignore[arg-type]
    except Image.UnidentifiedImageError:
        message = sniff_float_image(source)
        if message is not None:
            raise FloatImageError(message) from None
        raise
    with im:
        rawmode = _rawmode(im)  # before getexif(), which loads (and so forgets the tiles of) a PNG
        header = header_of(im)
        apply = choose_frame(header, exif, expected_hw)
        array = to_rgb8(im, source, rawmode)
    if array.shape[:2] != (header.height, header.width):  # a decoder disagreeing with its header
        raise ValueError(f"decoded {_wh(array.shape[1], array.shape[0])} != {_wh(header.width, header.height)} in its header")
    if apply and header.orientation != 1:
        array = apply_orientation(array, header.orientation)
    return DecodedImage(array, header, apply and header.orientation != 1)
