"""Safe output paths for image file names that come from a dataset JSON (which may be hostile).

An export that writes one file per image (YOLO labels, review pages, image links) names it after
the image's `file_name`. `safe_relative_path` maps any such name to a relative path that cannot
leave the output folder, and that no other image of the same export uses:

- Separators: backslashes count as slashes (Windows names); absolute paths, drive letters
  (`C:`), UNC roots, `.` and `..` components and empty components are dropped, so
  `../../etc/x.jpg` → `etc/x.jpg` and `/abs/x.jpg` → `abs/x.jpg`.
- Characters: NUL, control characters and `<>:"|?*` become `_`; trailing dots and spaces of a
  component are removed; Windows device names (`CON`, `nul.txt`, ...) get a leading `_`; a
  component is cut to 200 characters (keeping its extension). A name left empty becomes `image`.
- Uniqueness: subfolders are kept (`d1/img.jpg` and `d2/img.jpg` stay apart). A path already used
  — compared case-insensitively (`A.jpg` vs `a.jpg`: one file on macOS and Windows), as a file
  or as a folder — gets a suffix before its extension: `a~2.jpg`, `a~3.jpg`, ... A path whose
  folder is already a file (`x` then `x/y.jpg`) is flattened (`x__y.jpg`) and suffixed the same way.
  With `unique_stem`, paths that differ only in extension also count as the same (`a.jpg` and
  `a.png` both need `labels/a.txt` in a YOLO dataset).

`used` records what was handed out: files as their case-folded path, folders with a trailing `/`.
`inside(root, path)` checks that a path, resolved (symlinks followed), stays under `root`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Union

MAX_COMPONENT = 200
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
_DRIVE = re.compile(r"^[A-Za-z]:")
_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _clean_component(part: str) -> str:
    part = _BAD_CHARS.sub("_", part).rstrip(" .")
    if not part or part in (".", ".."):
        return ""
    if part.split(".")[0].lower() in _DEVICES:
        part = "_" + part
    if len(part) > MAX_COMPONENT:
        stem, dot, ext = part.rpartition(".")
        ext = dot + ext if dot and 0 < len(ext) <= 16 else ""
        part = part[: MAX_COMPONENT - len(ext)] + ext
    return part


def clean_relative_path(file_name: str) -> PurePosixPath:
    """`file_name` as a relative path that stays inside any folder it is joined to (see the
    module's rules); not yet made unique."""
    name = str(file_name).replace("\\", "/")
    name = _DRIVE.sub("", name)
    parts = [c for c in (_clean_component(p) for p in name.split("/")) if c]
    return PurePosixPath(*parts) if parts else PurePosixPath("image")


def _key(path: PurePosixPath, unique_stem: bool) -> str:
    return str(path.with_suffix("") if unique_stem and path.suffix else path).casefold()


def _with_suffix_number(path: PurePosixPath, n: int) -> PurePosixPath:
    return path.with_name(f"{path.stem}~{n}{path.suffix}")


def _free(path: PurePosixPath, used: set[str], unique_stem: bool) -> bool:
    key = _key(path, unique_stem)
    if key in used or key + "/" in used or str(path).casefold() in used:
        return False
    return all(str(parent).casefold() not in used for parent in path.parents if str(parent) != ".")


def _folder_is_a_file(path: PurePosixPath, used: set[str]) -> bool:
    return any(str(parent).casefold() in used for parent in path.parents if str(parent) != ".")


def safe_relative_path(file_name: str, used: set[str], *, unique_stem: bool = False) -> PurePosixPath:
    """A relative path for the image `file_name` that cannot leave the output folder and that is
    not in `used` (case-insensitively; see the module's rules); it is added to `used`."""
    path = clean_relative_path(file_name)
    if _folder_is_a_file(path, used):
        path = PurePosixPath("__".join(path.parts))
    candidate, n = path, 1
    while not _free(candidate, used, unique_stem):
        n += 1
        candidate = _with_suffix_number(path, n)
    used.add(_key(candidate, unique_stem))
    used.add(str(candidate).casefold())
    for parent in candidate.parents:
        if str(parent) != ".":
            used.add(str(parent).casefold() + "/")
    return candidate


def inside(root: Union[str, os.PathLike], path: Union[str, os.PathLike]) -> bool:
    """Whether `path`, with symlinks resolved, is `root` or lies under it. A relative `path` is
    relative to the current directory, as everywhere in Python (not to `root`): check a name
    with `inside(root, Path(root) / name)`."""
    base = Path(root).resolve()
    try:
        Path(path).resolve().relative_to(base)
    except ValueError:
        return False
    return True
