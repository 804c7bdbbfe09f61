"""Output formats of a labeling run, found by name. Every module of this package is imported, so
a new format is one new file defining an `OutputFormat` subclass with a `name`."""

from __future__ import annotations

import importlib
import pkgutil

from .base import JsonFileFormat, OutputFormat

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def format_names() -> list[str]:
    return sorted(OutputFormat.registry)


def get_format(name: str, **options) -> OutputFormat:
    """A fresh sink of the format called `name` (ValueError naming the known ones otherwise)."""
    if name not in OutputFormat.registry:
        raise ValueError(f"unknown output format {name!r} (known: {', '.join(format_names())})")
    return OutputFormat.registry[name](**options)


__all__ = ["JsonFileFormat", "OutputFormat", "format_names", "get_format"]
