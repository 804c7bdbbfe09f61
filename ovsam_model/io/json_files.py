"""Reading a user's JSON file: every way it can fail is one `InputError` line that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from ovsam_model.io.detections import InputError


def read_text(path: Union[str, Path], name: str) -> str:
    """The file's text (UTF-8, without the byte-order mark Windows tools write); `name` is how
    messages call it (e.g. "--ann x.json"). `path`: a local path, or a URI that fsspec reads
    (`ovsam_model.io.uris`)."""
    from ovsam_model.io.uris import location, read_bytes

    where = location(path)
    try:
        if isinstance(where, str):
            return read_bytes(where).decode("utf-8-sig")
        return where.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{name}: a folder, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read ({exc})") from None


def parse_json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # arrays nested thousands deep: json's decoder recurses
        raise InputError(f"{name}: JSON nested too deeply to read") from None


def read_json(path: Union[str, Path], name: str) -> Any:
    """One JSON document from `path` (`read_text` + `parse_json`)."""
    return parse_json(read_text(path, name), name)
