"""One switch for the exact fast paths of the model's modules.

Each module with a faster but numerically equivalent path (SDPA attention, folded batch norms,
the decoder's shared first layer, the projected attention pool, the truncated text tower) has a
boolean attribute `fast_path`, True by default; False runs the plain reference code. Benchmarks
and equivalence tests compare the two through `set_fast_path`.
"""

from __future__ import annotations

from torch import nn


def set_fast_path(model: nn.Module, enabled: bool) -> int:
    """Set `fast_path` on every submodule of `model` that has one; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fast_path"):
            module.fast_path = bool(enabled)
            count += 1
    return count
