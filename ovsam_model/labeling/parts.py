"""Resumable part files: finished images appended as JSON lines while a run goes on.

Layout of `<out>.partial.jsonl` (one file per rank under several ranks:
`<out>.partial.rank{r}.jsonl`):
  line 1:  {"ovsam_partial": 3, "fingerprint": ..., "options": {...}}   what the contents depend on
  owner:   {"owner": {"pid", "host", "started"}}                          who writes it (one per run)
  image:   {"record": {...}} × n, then {"image": {...}, "n": n}          one finished image: its records
           (+ "skipped" on the image line)                                 first, one per line, then its image line
  end:     {"done": true, "world": W}                                     this rank finished

An image counts as finished only once its image line is written: records without one (a process
killed mid-image) are cut off on resume, like a torn last line. One record per line means no
image's records are ever serialised (or parsed back) as one string. Each batch is flushed and
fsynced. While a run writes a part file it holds an exclusive OS lock (`flock`) on it: a second
run on the same output fails at once, naming the first one's pid, and never truncates its file;
a lock left by a killed process is released by the OS, so the next run simply takes it.

Entries are never held in memory: `PartIndex` keeps (file, byte offset) per image id, and the
merge reads them back one at a time in image-id order.
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence

from ovsam_model.io.detections import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]

PART_VERSION = 3


def part_path(out: Path, rank: int = 0, world: int = 1) -> Path:
    suffix = ".partial.jsonl" if world == 1 else f".partial.rank{rank}.jsonl"
    return out.with_name(out.name + suffix)


def all_part_paths(out: Path) -> list[Path]:
    """Every part file of `out`, whatever world size wrote it."""
    return sorted(p for p in out.parent.glob(out.name + ".partial*.jsonl") if p.is_file())


@dataclass
class Located:
    """Where one finished image's lines start (its first record, else its image line), how many
    records it has, and what the summary needs of it."""

    path: Path
    offset: int
    records: int
    skipped: Optional[str]
    image_offset: int  # of the image line


@dataclass
class PartScan:
    header: Optional[dict] = None
    entries: dict[int, Located] = field(default_factory=dict)
    done_worlds: set[int] = field(default_factory=set)
    owner: Optional[dict] = None
    valid_bytes: int = 0  # length of the intact prefix (a torn last line is cut off)


def scan_part(path: Path) -> PartScan:
    """Index a part file line by line (no entry is kept); a torn or garbled *last* line is ignored."""
    scan = PartScan()
    offset = 0
    first_record: Optional[int] = None  # offset of the first record of the image being read
    with open(path, "rb") as f:
        line = f.readline()
        while line:
            nxt = f.readline()
            if not line.endswith(b"\n"):
                break  # torn: the writer died mid-line
            if line.startswith(b'{"record":'):  # not parsed: records are read back by the merge only
                first_record = offset if first_record is None else first_record
                offset += len(line)
                line = nxt
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                if not nxt:
                    break  # the garbled last line
                raise InputError(f"{path}: corrupt part file at byte {offset}; delete it to start over") from None
            if "ovsam_partial" in obj:
                scan.header = obj
            elif "owner" in obj:
                scan.owner = obj["owner"]
            elif "done" in obj:
                scan.done_worlds.add(int(obj.get("world", 1)))
            elif "image" in obj:
                image_id = int(obj["image"]["id"])
                start = offset if first_record is None else first_record
                scan.entries.setdefault(image_id, Located(path, start, int(obj.get("n", 0)), obj.get("skipped"), offset))
            first_record = None
            offset += len(line)
            scan.valid_bytes = offset
            line = nxt
    return scan


def changed_options(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The option names whose values differ, e.g. ["--batch-size (2 → 4)", "--vocab"]; an option
    that only one side records (one stored only when on, such as --compile) reads "not set"."""
    def short(value: Any) -> bool:
        return value is None or isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 40)

    def shown(options: Mapping[str, Any], key: str) -> str:
        return str(options[key]) if key in options else "not set"

    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b or (key in old) != (key in new):
            out.append(f"{key} ({shown(old, key)} → {shown(new, key)})" if short(a) and short(b) else key)
    return out


def _owner_text(owner: Optional[dict]) -> str:
    if not owner:
        return "another ovsam label run"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"another ovsam label run (pid {owner.get('pid')} on {owner.get('host')}, started {started})"


_OPEN_WRITERS: "weakref.WeakSet[PartWriter]" = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): point each open part file's descriptor at /dev/null.

    An `flock` belongs to the open file, which a fork shares: without this, the workers of a run
    killed with SIGKILL would hold its lock until they noticed and exited (seconds), and a
    `--resume` started at once would be refused, naming the dead run. /dev/null, not a close: the
    child's file object may still flush or close that descriptor number."""
    for writer in list(_OPEN_WRITERS):
        if not writer._file.closed:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, writer._file.fileno())
            os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class PartWriter:
    """This rank's part file, locked for the writer's life (by this process only: forked children
    let go of it, `_drop_inherited_locks`); appends finished images."""

    def __init__(self, path: Path, fingerprint: str, options: Mapping[str, Any], *, resume: bool) -> None:
        self.path = path
        self.done: dict[int, Located] = {}
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # never O_TRUNC before the lock is ours
        self._file: IO[bytes] = os.fdopen(fd, "r+b")
        try:
            self._lock()
            self._start(fingerprint, dict(options), resume)
        except BaseException:
            self._file.close()
            raise
        _OPEN_WRITERS.add(self)

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = scan_part(self.path).owner
            raise InputError(f"{self.path} is being written by {_owner_text(owner)}; wait for it to finish or "
                             f"choose another --out") from None

    def _start(self, fingerprint: str, options: dict, resume: bool) -> None:
        scan = scan_part(self.path) if resume and self.path.stat().st_size else None
        if scan is not None and scan.header is not None:
            if scan.header.get("fingerprint") != fingerprint:
                changed = changed_options(scan.header.get("options", {}), options)
                what = ", ".join(changed) if changed else "the inputs"
                raise InputError(f"{self.path} was written with other options: {what}; rerun with the same ones, "
                                 f"or without --resume to start over")
            self.done = scan.entries
            self._file.truncate(scan.valid_bytes)
            self._file.seek(scan.valid_bytes)
        else:
            self._file.truncate(0)
            self._write([{"ovsam_partial": PART_VERSION, "fingerprint": fingerprint, "options": options}])
        self._write([{"owner": {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3)}}])

    def _write(self, objs: Iterable[dict]) -> None:
        for obj in objs:
            self._file.write(_dumps(obj) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, entries: Sequence[dict]) -> None:
        """Finished images ({"image", "records"[, "skipped"]}): each record on its own line, then
        the image line that marks it done; flushed and fsynced once for all."""
        for entry in entries:
            for record in entry["records"]:
                self._file.write(b'{"record":' + _dumps(record) + b"}\n")
            line = {"image": entry["image"], "n": len(entry["records"])}
            if entry.get("skipped"):
                line["skipped"] = entry["skipped"]
            self._file.write(_dumps(line) + b"\n")
        if entries:
            self._file.flush()
            os.fsync(self._file.fileno())

    def finish(self, world: int) -> None:
        self._write([{"done": True, "world": world}])

    def close(self) -> None:
        """Close (and so unlock) the file; it stays on disk for --resume or the merge."""
        if not self._file.closed:
            self._file.close()


def check_not_running(out: Path, rank: int = 0, world: int = 1) -> None:
    """Fail at once (before any model is built) when a live run writes this rank's part file of
    `out`. The lock taken by `PartWriter` is what really guards the file; this is the early word."""
    path = part_path(out, rank, world)
    if not path.exists():
        return
    handle = try_lock(path)
    if handle is None:
        raise InputError(f"{path} is being written by {_owner_text(scan_part(path).owner)}; wait for it to finish "
                         f"or choose another --out")
    handle.close()


def try_lock(path: Path) -> Optional[IO[bytes]]:
    """An exclusively locked handle on `path`, or None when a live run holds it."""
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
    return handle


class PartIndex:
    """Finished images of every part file of `out` made with `fingerprint`: image id → location."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.entries: dict[int, Located] = {}
        self.paths: list[Path] = []
        for path in all_part_paths(out):
            scan = scan_part(path)
            if scan.header is not None and scan.header.get("fingerprint") == fingerprint:
                self.paths.append(path)
                for image_id, where in scan.entries.items():
                    self.entries.setdefault(image_id, where)

    def missing(self, image_ids: Iterable[int]) -> list[int]:
        return [i for i in image_ids if i not in self.entries]

    def read(self, image_ids: Iterable[int]) -> Iterator[dict]:
        """The entries of `image_ids`, in that order, read one at a time. An entry's "records" is
        an iterator over its records, read from disk as it goes: consume it before asking for the
        next entry (formats do), so that no image's records are all in memory at once."""
        handles: dict[Path, IO[bytes]] = {}
        try:
            for image_id in image_ids:
                where = self.entries[image_id]
                handle = handles.get(where.path)
                if handle is None:
                    handle = handles[where.path] = open(where.path, "rb")
                handle.seek(where.image_offset)
                image = json.loads(handle.readline())
                entry = {"image": image["image"], "records": _records(handle, where)}
                if image.get("skipped"):
                    entry["skipped"] = image["skipped"]
                yield entry
        finally:
            for handle in handles.values():
                handle.close()


def _records(handle: IO[bytes], where: Located) -> Iterator[dict]:
    handle.seek(where.offset)
    for _ in range(where.records):
        yield json.loads(handle.readline())["record"]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def is_finished(path: Path, world: int) -> bool:
    """Whether the part file ends with this world size's done mark (reads only its tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return False
    return bool(last.get("done")) and int(last.get("world", 1)) == world
