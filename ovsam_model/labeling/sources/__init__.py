"""Prompt sources of a labeling run, found by option name. Every module of this package is
imported, so a new source is one new file defining a `PromptSource` subclass with an `option`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import PromptSource, SourceContext, prompts_digest

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def source_options() -> list[str]:
    return sorted(PromptSource.registry)


def make_source(option: str, value: Any, **settings: Any) -> PromptSource:
    """The source selected by `option` (e.g. "boxes") for `value`, with its `settings`."""
    if option not in PromptSource.registry:
        raise ValueError(f"unknown prompt source {option!r} (known: {', '.join(source_options())})")
    return PromptSource.registry[option](value, **settings)


__all__ = ["PromptSource", "SourceContext", "make_source", "prompts_digest", "source_options"]
