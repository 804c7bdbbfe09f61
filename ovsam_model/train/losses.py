"""CLIP2SAM mask losses (spec §6): sigmoid BCE and Dice on importance-sampled points.

Points are in normalised [0, 1] XY coordinates of the square model frame, so the 256² mask
logits and the 1024² ground-truth masks (both covering the padded square) are read at the same
places through `F.grid_sample` (align_corners=False: a value at pixel i covers [i, i + 1)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps [N, C, H, W] at points [N, P, 2] (normalised XY in [0, 1]) → [N, C, P]."""
    grid = (2.0 * points - 1.0).unsqueeze(2)  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False).squeeze(3)


def uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample: float = 3.0, importance: float = 0.75,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PointRend-style training points for mask_logits [N, 1, H, W] → [N, num_points, 2] in [0, 1].

    Draw `oversample · num_points` uniform points, keep the `importance · num_points` most uncertain
    (smallest |logit|, read bilinearly), and add the rest as fresh uniform points. No gradient.
    """
    n = mask_logits.shape[0]
    device = mask_logits.device
    drawn = int(oversample * num_points)
    kept = int(importance * num_points)
    with torch.no_grad():
        cand = torch.rand(n, drawn, 2, device=device, generator=generator)
        uncertainty = -point_sample(mask_logits.float(), cand)[:, 0].abs()  # [N, drawn]
        top = uncertainty.topk(kept, dim=1).indices  # [N, kept]
        chosen = cand.gather(1, top[..., None].expand(-1, -1, 2))
        fresh = torch.rand(n, num_points - kept, 2, device=device, generator=generator)
        return torch.cat([chosen, fresh], dim=1)


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits [N, P] vs targets [N, P] in [0, 1], averaged over all entries."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="mean")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per mask 1 − (2·Σ p·t + eps) / (Σ p + Σ t + eps), p = sigmoid(logits); mean over the N masks."""
    p = logits.float().sigmoid()
    t = targets.float()
    dice = (2.0 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)
    return (1.0 - dice).mean()


def sample_mask_points(mask_logits: torch.Tensor, gt_masks: torch.Tensor, num_points: int = 12544,
                       oversample: float = 3.0, importance: float = 0.75,
                       generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, P], targets [N, P]) of mask_logits [N, 1, h, w] and gt_masks [N, 1, H, W] (0/1)
    read at the same uncertainty-sampled points of the square frame."""
    points = uncertain_points(mask_logits, num_points, oversample, importance, generator)
    pred = point_sample(mask_logits.float(), points)[:, 0]
    with torch.no_grad():
        target = point_sample(gt_masks.float(), points)[:, 0]
    return pred, target


def point_losses(pred: torch.Tensor, target: torch.Tensor, dice_eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of sampled logits [N, P] against targets [N, P] (both unweighted, float32)."""
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0
        return zero, zero
    return sigmoid_bce(pred, target), dice_loss(pred, target, dice_eps)


def mask_point_losses(mask_logits: torch.Tensor, gt_masks: torch.Tensor, num_points: int = 12544,
                      oversample: float = 3.0, importance: float = 0.75, dice_eps: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of mask_logits [N, 1, h, w] against gt_masks [N, 1, H, W] (0/1) on the same
    uncertainty-sampled points of the square frame (both unweighted, float32)."""
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0
        return zero, zero
    pred, target = sample_mask_points(mask_logits, gt_masks, num_points, oversample, importance, generator)
    return point_losses(pred, target, dice_eps)
