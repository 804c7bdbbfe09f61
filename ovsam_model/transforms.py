"""Every change of coordinate frame: original pixels ↔ the padded square model input.

The model frame is SAM's: resize so the longest side is `size` (`ResizeLongestSide.apply_image`,
the PIL bilinear resize SAM's own predictor uses), normalise, zero-pad bottom/right to size².
Prompt coordinates are scaled by the same factors as `ResizeLongestSide.apply_coords`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from .config import PIXEL_MEAN, PIXEL_STD
from .types import PreparedImage


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `size` (SAM's rounding)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, size: int = 1024) -> PreparedImage:
    """HxWx3 uint8 RGB → the compact form of `prepare_image`: [3, h, w] uint8, resized only.

    What labeling's DataLoader workers make: `model_input` pads and normalises it where the model
    runs, so a worker ships (and the host copies to a GPU) a quarter of the bytes of the float
    input, and the model sees the same numbers."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got {image.dtype}")
    height, width = image.shape[:2]
    resized = ResizeLongestSide(size).apply_image(np.ascontiguousarray(image))  # (h, w) = resized_shape(...)
    return PreparedImage(pixels=torch.from_numpy(resized).permute(2, 0, 1).contiguous(), original_size=(height, width),
                         input_size=(int(resized.shape[0]), int(resized.shape[1])))


def _normalise(x: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]) -> torch.Tensor:
    """[..., 3, h, w] uint8 → float32 (x - mean) / std (the one formula of both input forms)."""
    mean_t, std_t = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (mean, std))
    return x.float().sub_(mean_t).div_(std_t)


def _padded_float(compact: PreparedImage, size: int, mean: tuple[float, float, float],
                  std: tuple[float, float, float]) -> torch.Tensor:
    """A `resize_image` output → the [3, size, size] float input `prepare_image` makes of it."""
    h, w = compact.input_size
    return F.pad(_normalise(compact.pixels, mean, std), (0, size - w, 0, size - h))


def prepare_image(
    image: np.ndarray,
    size: int = 1024,
    mean: tuple[float, float, float] = PIXEL_MEAN,
    std: tuple[float, float, float] = PIXEL_STD,
) -> PreparedImage:
    """HxWx3 uint8 RGB → [3, size, size] float32, normalised and zero-padded."""
    compact = resize_image(image, size)
    return PreparedImage(pixels=_padded_float(compact, size, mean, std).contiguous(),
                         original_size=compact.original_size, input_size=compact.input_size)


def model_input(images: Sequence[PreparedImage], size: int, mean: tuple[float, float, float],
                std: tuple[float, float, float], device: torch.device | str) -> torch.Tensor:
    """The model's [B, 3, size, size] float32 input on `device`, from prepared images of either form.

    Float pixels (`prepare_image`) are stacked as they are. Compact ones (`resize_image`: uint8,
    resized only) are padded as bytes, copied to the device (through pinned memory to a GPU, without
    blocking) and normalised there, their padding set to 0 as `prepare_image` leaves it: the same
    float32 numbers either way."""
    device = torch.device(device)
    if not all(im.pixels.dtype == torch.uint8 for im in images):
        return torch.stack([im.pixels if im.pixels.is_floating_point() else _padded_float(im, size, mean, std)
                            for im in images]).to(device, non_blocking=True)
    pinned = device.type == "cuda"
    batch = torch.zeros(len(images), 3, size, size, dtype=torch.uint8, pin_memory=pinned)
    for i, im in enumerate(images):
        h, w = im.input_size
        batch[i, :, :h, :w] = im.pixels
    x = _normalise(batch.to(device, non_blocking=pinned), mean, std)
    for i, im in enumerate(images):
        h, w = im.input_size
        x[i, :, h:, :] = 0
        x[i, :, :h, w:] = 0
    return x


def coords_to_model(coords: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """[..., 2] XY in original pixels → the resized frame (no +0.5 shift: SAM's prompt encoder adds it)."""
    (oh, ow), (h, w) = original_size, input_size
    scale = coords.new_tensor([w / ow, h / oh])
    return coords * scale


def boxes_to_model(boxes: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """[N, 4] XYXY original pixels → XYXY in the resized frame."""
    return coords_to_model(boxes.reshape(-1, 2, 2), original_size, input_size).reshape(-1, 4)


def boxes_to_original(boxes: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `boxes_to_model`."""
    (oh, ow), (h, w) = original_size, input_size
    scale = boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])
    return boxes * scale


def masks_to_original_exact(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024
) -> torch.Tensor:
    """SAM's post-processing, step for step (`Sam.postprocess_masks`).

    low_res: [N, C, s, s] logits → [N, C, H, W] logits at the original size.
    """
    x = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


def _fast_grid(
    input_size: tuple[int, int], original_size: tuple[int, int], size: int, s: int, device: torch.device,
    transposed: bool = False,
) -> torch.Tensor:
    """grid_sample coordinates of every original pixel centre on the s×s low-res grid.

    [1, H, W, 2] (x, y) in grid_sample's normalised frame, or [1, W, H, 2] when `transposed`
    (the same coordinates, indexed [x, y]): sampling with it gives each map transposed, every
    value computed exactly as in the untransposed layout.
    """
    (oh, ow), (h, w) = original_size, input_size
    # original pixel centre j → resized frame (j + .5) * w / ow → low-res frame / (size / s)
    down = size / s
    xs = (torch.arange(ow, device=device, dtype=torch.float32) + 0.5) * (w / ow) / down
    ys = (torch.arange(oh, device=device, dtype=torch.float32) + 0.5) * (h / oh) / down
    # grid_sample, align_corners=False: normalised = 2 * pos / s - 1 where pos counts from the edge
    gx, gy = 2 * xs / s - 1, 2 * ys / s - 1
    if transposed:
        grid = torch.stack([gx.view(ow, 1).expand(ow, oh), gy.view(1, oh).expand(ow, oh)], dim=-1)
    else:
        grid = torch.stack([gx.view(1, ow).expand(oh, ow), gy.view(oh, 1).expand(oh, ow)], dim=-1)
    return grid.unsqueeze(0)


def _sample(low_res: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of [N, C, s, s] logits at a [1, A, B, 2] grid → [N, C, A, B]."""
    grid = grid.to(low_res.dtype).expand(low_res.shape[0], -1, -1, -1)
    return F.grid_sample(low_res, grid, mode="bilinear", padding_mode="border", align_corners=False)


def masks_to_original_fast(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024
) -> torch.Tensor:
    """One bilinear interpolation from the low-res logits straight to the original size.

    low_res: [N, C, s, s] logits → [N, C, H, W] logits. Samples the low-res grid at the exact
    position of each original pixel centre (the valid, un-padded region only), so it never
    materialises size² maps. Differs from `masks_to_original_exact` only by the smoothing of
    the double interpolation.
    """
    return _sample(low_res, _fast_grid(input_size, original_size, size, low_res.shape[-1], low_res.device))


# Float32 elements of full-size mask logits alive at once (2**25: 128 MiB).
MASK_PIXEL_BUDGET = 2**25

POSTPROCESS_MODES = ("fast", "exact")


def mask_step(original_size: tuple[int, int], size: int = 1024, mode: str = "fast") -> int:
    """Masks per post-processing step, so that their float maps (the original size, plus the
    size² intermediate of "exact") stay within `MASK_PIXEL_BUDGET` elements; at least 1."""
    per_mask = original_size[0] * original_size[1] + (size * size if mode == "exact" else 0)
    return max(1, MASK_PIXEL_BUDGET // per_mask)


def iter_binary_masks_wh(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024,
    mode: str = "fast",
) -> Iterator[torch.Tensor]:
    """[N, 1, s, s] logits → successive [n, W, H] bool tensors (logits > 0) on the logits' device,
    in prompt order.

    Each yield holds `mask_step` masks at most, transposed and C-contiguous: the bytes of the
    Fortran-ordered H×W×n array pycocotools encodes (`io.masks.encode_rle_wh`); `.transpose(1, 2)`
    gives the [n, H, W] masks. "fast" (`masks_to_original_fast`) samples straight into that
    layout; "exact" (`masks_to_original_exact`) transposes each step's bools once.
    """
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f"mask post-processing must be one of {POSTPROCESS_MODES}, got {mode!r}")
    step = mask_step(original_size, size, mode)
    grid = None
    if mode == "fast":
        grid = _fast_grid(input_size, original_size, size, low_res.shape[-1], low_res.device, transposed=True)
    for s in range(0, low_res.shape[0], step):
        x = low_res[s : s + step].float()
        if grid is not None:
            yield _sample(x, grid)[:, 0] > 0
        else:
            exact = masks_to_original_exact(x, input_size, original_size, size)[:, 0] > 0
            yield exact.transpose(1, 2).contiguous()


def iter_mask_logits(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024,
    mode: str = "fast",
) -> Iterator[torch.Tensor]:
    """[N, 1, s, s] logits → successive [n, H, W] float32 logits at the original size, on the
    input's device, `mask_step` masks at a time (what segment-everything's stability score and
    crop-edge filter read before the masks are thresholded)."""
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f"mask post-processing must be one of {POSTPROCESS_MODES}, got {mode!r}")
    step = mask_step(original_size, size, mode)
    grid = _fast_grid(input_size, original_size, size, low_res.shape[-1], low_res.device) if mode == "fast" else None
    for s in range(0, low_res.shape[0], step):
        x = low_res[s : s + step].float()
        yield (_sample(x, grid) if grid is not None else masks_to_original_exact(x, input_size, original_size, size))[:, 0]
