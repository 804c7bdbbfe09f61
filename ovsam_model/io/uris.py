"""Inputs given as URIs: object storage (`s3://`, `gs://`, `az://`, ...), HTTP, or anything fsspec reads.

A URI is a string that starts with `PROTOCOL://` (or an fsspec chain, `simplecache::s3://...`),
except `file://`, which names a local path (`location` turns it into one). Everything else is a
local path and is read as before, without importing fsspec.

Protocol packages (s3fs for `s3://`, gcsfs for `gs://`, adlfs for `az://`) are the user's to
install; a missing one is a one-line `InputError` that says what to `pip install`. Credentials
and endpoints come from each package's own configuration (AWS_PROFILE, AWS_ENDPOINT_URL, ...,
or fsspec's `FSSPEC_<PROTOCOL>_<OPTION>` variables), in the driver and in every worker alike.

Errors keep the shape of local ones: a missing object raises `FileNotFoundError` (a prefix
given as a file `IsADirectoryError`), and anything else a backend raises while reading (no
credentials, a refused connection) an `OSError` naming it, so that callers report a URI as they
report a local path. Outputs stay local (`local_output`).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote, urlparse

from ovsam_model.io.detections import InputError

PathLike = Union[str, Path]
Location = Union[Path, str]  # a local path, or a URI (a str)

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*::)*[A-Za-z][A-Za-z0-9+.\-]*://")  # proto:// or a chain a::b://
HEADER_BLOCK = 1 << 16  # bytes fetched per read when only an image's header is needed


def is_uri(value: Any) -> bool:
    """Whether `value` is a URI read through fsspec: a str that starts with `PROTOCOL://` (or a
    chain such as `simplecache::s3://`), other than `file://`. A `Path` is never one."""
    return isinstance(value, str) and _URI.match(value) is not None and not value.startswith("file://")


def location(value: PathLike) -> Location:
    """A URI as given (a str), or a local `Path`; `file://` URIs become their local path."""
    if isinstance(value, str):
        if value.startswith("file://"):
            parsed = urlparse(value)
            if parsed.netloc not in ("", "localhost"):
                raise InputError(f"{value}: a file:// URI on another host ({parsed.netloc}); give a local path")
            return Path(unquote(parsed.path))
        if is_uri(value):
            return value
    return Path(value)


def join(root: Location, name: str) -> Location:
    """`root / name` for a local folder; `root/name` for a URI."""
    if isinstance(root, str):
        return f"{root.rstrip('/')}/{name}"
    return root / name


def local_output(out: PathLike, name: str = "--out") -> Path:
    """The local path of an output (`file://` accepted); a URI is a one-line `InputError`."""
    if is_uri(out):
        raise InputError(f"{name} {out}: outputs are written to a local file (atomically, with a part file to "
                         f"resume from); give a local path and copy the result to object storage afterwards")
    return Path(location(out))


def _protocol(uri: str) -> str:
    return re.split(r"://|::", uri, maxsplit=1)[0]


def _install_hint(protocol: str, exc: ImportError) -> str:
    """What to `pip install` for `protocol`, from fsspec's registry of known implementations."""
    from fsspec.registry import known_implementations

    package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
    if not package or package == "fsspec":  # an fsspec filesystem missing a dependency (http: aiohttp)
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        package = (getattr(cause, "name", None) or "").split(".")[0]
    return f"pip install {package}" if package else str(exc)


def filesystem(uri: str, name: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of `uri`; `name` is how messages call the input (e.g.
    "--images s3://bucket/val2017"). A protocol whose package is not installed, or that fsspec does
    not know, is a one-line `InputError`."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise InputError(f"{name}: reading URIs needs fsspec (pip install fsspec)") from None
    protocol = _protocol(uri)
    try:
        return url_to_fs(uri)
    except ImportError as exc:
        raise InputError(f"{name}: {protocol}:// needs a package that is not installed ({_install_hint(protocol, exc)})"
                         ) from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise InputError(f"{name}: unknown protocol {protocol}:// (not one that fsspec reads)") from None
        raise InputError(f"{name}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _as_os_error(exc: Exception) -> OSError:
    """A backend's own exception (botocore's NoCredentialsError, ...) as the OSError callers expect."""
    return OSError(f"{type(exc).__name__}: {_first_line(exc)}")


def read_bytes(uri: str) -> bytes:
    """The whole object. Raises FileNotFoundError (no such object), IsADirectoryError (a folder or
    prefix), OSError (anything else), or `InputError` (protocol not installed)."""
    fs, path = filesystem(uri, uri)
    try:
        return fs.cat_file(path)  # one request, no separate HEAD
    except FileNotFoundError:
        if _isdir(fs, path):
            raise IsADirectoryError(f"{uri} is a folder") from None
        raise FileNotFoundError(f"no such object: {uri}") from None
    except IsADirectoryError:
        raise
    except OSError:
        raise
    except Exception as exc:
        raise _as_os_error(exc) from exc


def _isdir(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False


class NamedBytes(io.BytesIO):
    """An object's bytes as a file, shown by its URI in messages (PIL names the file it cannot
    identify by its repr)."""

    def __init__(self, data: bytes, uri: str) -> None:
        super().__init__(data)
        self.uri = uri

    def __repr__(self) -> str:
        return repr(self.uri)


def open_header(uri: str) -> Any:
    """The object as a seekable file that fetches `HEADER_BLOCK` bytes at a time (to read an
    image's header without downloading the whole image). Errors as `read_bytes`."""
    fs, path = filesystem(uri, uri)
    try:
        return fs.open(path, "rb", block_size=HEADER_BLOCK)
    except OSError:
        raise
    except Exception as exc:
        raise _as_os_error(exc) from exc


def check_folder(uri: str, option: str) -> None:
    """A one-line `InputError` unless `uri` is a folder (a prefix with objects, or a bucket)."""
    name = f"{option} {uri}"
    fs, path = filesystem(uri, name)
    try:
        found = fs.isdir(path)
    except Exception as exc:
        raise InputError(f"{name}: cannot read ({_first_line(exc)})") from None
    if not found:
        raise InputError(f"{name}: no such directory")


def list_files(root: str, option: str = "--images") -> list[tuple[str, str]]:
    """Every object under the folder `root`, as (name relative to it, URI), sorted by name."""
    fs, path = filesystem(root, f"{option} {root}")
    base = path.rstrip("/") + "/"
    try:
        found = fs.find(path)
    except Exception as exc:
        raise InputError(f"{option} {root}: cannot list ({_first_line(exc)})") from None
    names = sorted(p[len(base):] for p in found if p.startswith(base) and not p.endswith("/"))
    return [(name, join(root, name)) for name in names]  # type: ignore[misc]


def exists_under(root: str, option: str = "--images") -> Callable[[str], bool]:
    """A function name → whether `root/name` exists, answered from one listing of `root` (made on
    its first call): what looking up many files costs one request per thousand objects."""
    listing: Optional[set[str]] = None

    def exists(name: str) -> bool:
        nonlocal listing
        if listing is None:
            listing = {relative for relative, _ in list_files(root, option)}
        return name in listing

    return exists
