"""Every change of coordinate frame: original pixels ↔ the padded square model input.

The model frame is SAM's: resize so the longest side is `size` (`ResizeLongestSide.apply_image`,
the PIL bilinear resize SAM's own predictor uses), normalise, zero-pad bottom/right to size².
Prompt coordinates are scaled by the same factors as `ResizeLongestSide.apply_coords`.
"""

from __future__ import annotations

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


def prepare_image(
    image: np.ndarray,
    size: int = 1024,
    mean: tuple[float, float, float] = PIXEL_MEAN,
    std: tuple[float, float, float] = PIXEL_STD,
) -> PreparedImage:
    """HxWx3 uint8 RGB → [3, size, size] float32, normalised and zero-padded."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got {image.dtype}")
    height, width = image.shape[:2]
    h, w = resized_shape(height, width, size)
    resized = ResizeLongestSide(size).apply_image(np.ascontiguousarray(image))
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    x = F.pad(x, (0, size - w, 0, size - h))
    return PreparedImage(pixels=x.contiguous(), original_size=(height, width), input_size=(h, w))


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


def masks_to_original_fast(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024
) -> torch.Tensor:
    """One bilinear interpolation from the low-res logits straight to the original size.

    Samples the low-res grid at the exact position of each original pixel centre (the valid,
    un-padded region only), so it never materialises size² maps. Differs from
    `masks_to_original_exact` only by the smoothing of the double interpolation.
    """
    n, c, s, _ = low_res.shape
    (oh, ow), (h, w) = original_size, input_size
    # original pixel centre j → resized frame (j + .5) * w / ow → low-res frame / (size / s)
    down = size / s
    xs = (torch.arange(ow, device=low_res.device, dtype=torch.float32) + 0.5) * (w / ow) / down
    ys = (torch.arange(oh, device=low_res.device, dtype=torch.float32) + 0.5) * (h / oh) / down
    # grid_sample, align_corners=False: normalised = 2 * pos / s - 1 where pos counts from the edge
    gx = (2 * xs / s - 1).view(1, ow).expand(oh, ow)
    gy = (2 * ys / s - 1).view(oh, 1).expand(oh, ow)
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).to(low_res.dtype).expand(n, oh, ow, 2)
    return F.grid_sample(low_res, grid, mode="bilinear", padding_mode="border", align_corners=False)


# Float32 elements of full-size mask logits alive at once (2**25: 128 MiB).
MASK_PIXEL_BUDGET = 2**25


def binary_masks_to_original(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024,
    mode: str = "fast",
) -> torch.Tensor:
    """[N, 1, s, s] logits → [N, H, W] bool masks on the CPU (logits > 0).

    `mode` "fast" (`masks_to_original_fast`) or "exact" (`masks_to_original_exact`). Float maps at
    the original size exist for a few prompts at a time only, so large images stay bounded.
    """
    to_original = {"fast": masks_to_original_fast, "exact": masks_to_original_exact}[mode]
    step = max(1, MASK_PIXEL_BUDGET // (original_size[0] * original_size[1]))
    out = torch.empty(low_res.shape[0], *original_size, dtype=torch.bool)
    for s in range(0, low_res.shape[0], step):
        logits = to_original(low_res[s : s + step].float(), input_size, original_size, size)
        out[s : s + step] = (logits[:, 0] > 0).cpu()
    return out
