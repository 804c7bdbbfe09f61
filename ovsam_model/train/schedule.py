"""The distillation optimiser and learning-rate schedule (spec §6).

AdamW with weight decay on weight matrices/kernels only (no decay on norms, biases or the level
embedding); lr: linear warm-up, then cosine down to `min_ratio` × lr.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("level_encoding",)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.01) -> float:
    """Multiplier of the base lr at iteration `step` (0-based).

    Warm-up: (step + 1) / warmup for step < warmup. Then cosine from 1 to `min_ratio` over the
    remaining `total - warmup` iterations: min + (1 - min) · ½(1 + cos(π · (step - warmup) / (total - warmup))).
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float,
                 no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> list[dict]:
    """Trainable parameters split into [decayed, not decayed]: 1-D tensors (norm weights,
    biases) and names containing any of `no_decay_names` get no weight decay."""
    skip = tuple(no_decay_names)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(s in name for s in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; `scheduler.last_epoch` is the iteration count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, min_ratio))
