"""What an output format is: a sink that receives the finished images in image-id order.

The engine merges the part files and feeds each format one entry per image
(`ovsam_model.labeling.records.Entry`), then tells it that the run has ended. A format writes
nothing that looks complete before `end`: single-file formats write a temp file and rename it
(`JsonFileFormat`), so a crash leaves no half-written output.

A new format is one new module in this package defining a subclass with a `name`; it is found
by name (`get_format`) and listed in `ovsam label --format`.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, ClassVar, Optional, Sequence

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
        """The record's mask in this format's encoding (records carry compressed RLE)."""
        if self.segmentation == "rle":
            return record["segmentation"]
        return rle_polygons(record["segmentation"])


def rle_polygons(rle: dict) -> list[list[float]]:
    """A compressed RLE → COCO polygons of its outer contours (one mask decoded at a time)."""
    from pycocotools import mask as mask_utils

    from ovsam_model.io.masks import mask_polygons

    return mask_polygons(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


class JsonFileFormat(OutputFormat):
    """A format that is one JSON document, streamed piece by piece into a temp file next to `out`
    (renamed onto it by `end`) or onto standard output."""

    def begin(self, out: Optional[Path], categories: Sequence[dict]) -> None:
        self._out = out
        self._tmp: Optional[str] = None
        if out is None:
            self._stream: IO[str] = sys.stdout
        else:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            self._stream = os.fdopen(fd, "w", encoding="utf-8")
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
        if self._tmp is not None:
            os.fsync(self._stream.fileno())
            self._stream.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes 0600
            os.replace(self._tmp, self._out)  # type: ignore[arg-type]
            self._tmp = None
        return self.count

    def abort(self) -> None:
        if self._tmp is not None:
            self._stream.close()
            os.unlink(self._tmp)
            self._tmp = None
