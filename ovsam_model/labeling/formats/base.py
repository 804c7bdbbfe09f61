"""What an output format is: a sink that receives the finished images in image-id order.

The engine merges the part files and feeds each format one entry per image
(`ovsam_model.labeling.records.Entry`), then tells it that the run has ended. A format writes
nothing that looks complete before `end`: single-file formats write a temp file and rename it
(`JsonFileFormat`, through `ovsam_model.atomic.atomic_path`), so a crash leaves no half-written
output.

A new format is one new module in this package defining a subclass with a `name`; it is found
by name (`get_format`) and listed in `ovsam label --format`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import sys
from pathlib import Path
from typing import IO, Any, ClassVar, Optional, Sequence

from ovsam_model.atomic import atomic_path

from ..records import Entry

SEGMENTATIONS = ("rle", "polygons")


class OutputFormat(abc.ABC):
    """A sink for one run's output. `out` is a path, or None for standard output."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["OutputFormat"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            OutputFormat.registry[cls.name] = cls

    def __init__(self, *, segmentation: str = "rle") -> None:
        if segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {segmentation!r}")
        self.segmentation = segmentation
        self.count = 0  # records written

    @abc.abstractmethod
    def begin(self, out: Optional[Path], categories: Sequence[dict]) -> None:
        """Start the output; `categories` [{id, name, ...}] are the ids the records use."""

    @abc.abstractmethod
    def add(self, entry: Entry) -> None:
        """One finished image (skipped ones too: `entry["skipped"]` says why). `entry["records"]`
        may be an iterator read from disk as it goes: iterate it once, within this call."""

    @abc.abstractmethod
    def end(self) -> int:
        """Complete the output (atomically); returns the number of records written."""

    def abort(self) -> None:
        """Drop whatever was started (the run failed); the previous output, if any, is kept."""

    def segmentation_of(self, record: dict) -> Any:
        """The record's mask in this format's encoding (records carry compressed RLE; polygons
        decode one mask at a time)."""
        if self.segmentation == "rle":
            return record["segmentation"]
        from ovsam_model.io.masks import mask_polygons

        return mask_polygons(record["segmentation"])


class JsonFileFormat(OutputFormat):
    """A format that is one JSON document, streamed piece by piece into a temp file next to `out`
    (renamed onto it by `end`) or onto standard output."""

    def begin(self, out: Optional[Path], categories: Sequence[dict]) -> None:
        self._target = contextlib.ExitStack()  # holds `atomic_path` open until end() / abort()
        if out is None:
            self._stream: IO[str] = sys.stdout
        else:
            tmp = self._target.enter_context(atomic_path(out))
            self._stream = self._target.enter_context(open(tmp, "w", encoding="utf-8"))
        self.open_document(categories)

    def write(self, text: str) -> None:
        self._stream.write(text)

    @staticmethod
    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))

    @abc.abstractmethod
    def open_document(self, categories: Sequence[dict]) -> None:
        """Write the document's opening."""

    @abc.abstractmethod
    def close_document(self) -> None:
        """Write the document's end."""

    def end(self) -> int:
        self.close_document()
        self._stream.write("\n")
        self._stream.flush()
        self._target.close()  # closes the temp file, fsyncs it and renames it onto `out`
        return self.count

    def abort(self) -> None:
        aborted = RuntimeError("output aborted")
        self._target.__exit__(type(aborted), aborted, None)  # `atomic_path` removes the temp file
