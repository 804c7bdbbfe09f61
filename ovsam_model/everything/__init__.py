"""Segment and name everything: grid clicks → stable, deduplicated masks, each with an open-vocabulary label.

`EverythingSettings` (torch-free) holds the options; `EverythingGenerator` (in `generator`)
runs them with a predictor. The names of `generator` are imported on first use, so that
checking options imports no torch.
"""

from __future__ import annotations

from typing import Any

from .settings import EverythingSettings, option_name

_GENERATOR_NAMES = ("EverythingGenerator", "EverythingInput", "EverythingMasks", "everything_preparer",
                    "iter_everything_records", "prepare_everything", "remove_small_mask_regions")


def __getattr__(name: str) -> Any:
    if name in _GENERATOR_NAMES:
        from . import generator

        return getattr(generator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EverythingSettings", "option_name", *_GENERATOR_NAMES]
