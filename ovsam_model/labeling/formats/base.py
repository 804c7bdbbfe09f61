"""What an output format is: a sink that receives the finished images in image-id order.

The engine merges the part files and feeds each format one entry per image
(`ovsam_model.labeling.records.Entry`), then tells it that the run has ended. A format writes
nothing that looks complete before `end`: single-file formats write a temp file and rename it
(`JsonFileFormat`, through `ovsam_model.atomic.atomic_path`), so a crash leaves no half-written
output.

A new format is one new module in this package defining a subclass with a `name`; it is found
by name (`get_format`) and listed in `ovsam label --format`.

Folder formats (`DirectoryFormat`, e.g. a YOLO dataset) build the whole folder under a hidden
temp name next to `out` and rename it onto `out` at the end; every file goes through
`DirectoryFormat.path_for`, which refuses any path outside the folder.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar, Optional, Sequence

from ovsam_model.atomic import atomic_path, make_temp_directory, replace_directory

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

    def check_out(self, out: Optional[Path]) -> None:
        """Refuse (ValueError, one line) an `out` this format cannot write, before any work."""

    def segmentation_of(self, record: dict) -> Any:
        """The record's mask in this format's encoding (records carry compressed RLE; polygons
        decode one mask at a time)."""
        if self.segmentation == "rle":
            return record["segmentation"]
        from ovsam_model.io.masks import mask_polygons

        return mask_polygons(record["segmentation"])


class JsonFileFormat(OutputFormat):
    """A format that is one JSON document, streamed piece by piece into a temp file next to `out`
    (renamed onto it by `end`), or into an unnamed temp file that `end` copies to standard output."""

    def check_out(self, out: Optional[Path]) -> None:
        if out is not None and Path(out).is_dir():
            raise ValueError(f"--out {out} is a folder; format {self.name} writes one file")

    def begin(self, out: Optional[Path], categories: Sequence[dict]) -> None:
        self._target = contextlib.ExitStack()  # holds `atomic_path` open until end() / abort()
        self._to_stdout = out is None
        if out is None:  # spooled, copied to stdout by end(): a failed run prints no half document
            self._stream: IO[str] = self._target.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
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
        if self._to_stdout:
            self._stream.seek(0)
            shutil.copyfileobj(self._stream, sys.stdout)
            sys.stdout.flush()
        self._target.close()  # closes the temp file, fsyncs it and renames it onto `out`
        return self.count

    def abort(self) -> None:
        aborted = RuntimeError("output aborted")
        self._target.__exit__(type(aborted), aborted, None)  # `atomic_path` removes the temp file


class DirectoryFormat(OutputFormat):
    """A format that is a folder. It is built in a hidden temp folder next to `out`
    (`.NAME.XXXX.tmp`) and renamed onto `out` by `end`, so a crash never leaves a half-written
    folder under the output's name. An existing `out` is replaced only when it is empty or is an
    earlier output of this format (it holds `marker`); the old one is removed after the rename."""

    marker: ClassVar[str] = ""  # a file every output of the format has, e.g. "data.yaml"

    def check_out(self, out: Optional[Path]) -> None:
        if out is None:
            raise ValueError(f"format {self.name} writes a folder: give --out DIR (not standard output)")
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; format {self.name} writes a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / self.marker).is_file():
            raise ValueError(f"--out {out} is a folder that is not an earlier {self.name} output (no {self.marker}); "
                             f"choose another or remove it")

    def begin(self, out: Optional[Path], categories: Sequence[dict]) -> None:
        self.check_out(out)
        self.out = Path(out)  # type: ignore[arg-type]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.root = make_temp_directory(self.out)
        self.open_directory(categories)

    def path_for(self, relative: PurePosixPath) -> Path:
        """The temp folder's path for `relative` (parent folders made); ValueError if it would
        leave the folder (a `safe_paths.safe_relative_path` never does)."""
        from ovsam_model.io.safe_paths import inside

        path = self.root / Path(*PurePosixPath(relative).parts)
        if PurePosixPath(relative).is_absolute() or not inside(self.root, path):
            raise ValueError(f"refusing to write {relative!s} outside the output folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @abc.abstractmethod
    def open_directory(self, categories: Sequence[dict]) -> None:
        """Start the folder's content in `self.root`."""

    @abc.abstractmethod
    def close_directory(self) -> None:
        """Write the folder's last files (the marker among them)."""

    def end(self) -> int:
        self.close_directory()
        _fsync_tree(self.root)
        replace_directory(self.root, self.out)
        return self.count

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
