"""What a training run leaves for people and plots: `OUT/metrics.jsonl` and `OUT/config.json`.

metrics.jsonl is append-only, one JSON object per logged step, fsynced line by line: `step`
(iterations done), `epoch`, the loss and its terms, `lr`, `grad_norm`, `images_per_s`, and on
eval steps `eval` (name → figure). A step-0 line holds the eval before training. A crash can
leave a truncated last line, which readers skip; `--resume` from `last.pth` at step k keeps the
lines of steps ≤ k (the later ones are recomputed), so every step appears exactly once.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Mapping, Optional

from ..atomic import atomic_path, write_json_atomic

METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOCK = ".run.lock"
VERSIONED = ("torch", "torchvision", "open_clip_torch", "segment-anything", "numpy", "ovsam")


class RunFolderBusy(ValueError):
    """Another training run writes the same output folder."""


def claim_run_folder(out: Path) -> IO[bytes]:
    """Lock `OUT/.run.lock` for this run's life (the handle holds it; closing or dying frees it),
    so that a second run on the same folder stops at once instead of interleaving last.pth and
    metrics.jsonl with the first. The file names the holder (pid, host, start)."""
    from ..labeling.parts import try_lock

    path = Path(out) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    handle = try_lock(path)
    if handle is None:
        try:
            holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder else "?"
        raise RunFolderBusy(f"{out} is being written by another training run ({who}); wait for it to finish or "
                            f"choose another --out")
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": _dt.datetime.now().isoformat(timespec="seconds")}).encode())
    handle.flush()
    return handle


def read_metrics_lines(path: Path) -> list[dict]:
    """The records of a metrics log, in file order: the one reader of metrics.jsonl (resume,
    the run's summary, `ovsam plot`).

    Blank lines are skipped, and so is an unparsable last line (the line a crash cut off).
    Any other line that is not a JSON object with a numeric `step` (and an `eval` that is an
    object, if any) raises ValueError: "PATH: malformed line N: why"."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for i, (n, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:  # a truncated last line
                break
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}: malformed line {n}: {reason}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: malformed line {n}: not a JSON object")
        step = record.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            raise ValueError(f"{path}: malformed line {n}: no numeric 'step'")
        if "eval" in record and not isinstance(record["eval"], (dict, type(None))):
            raise ValueError(f"{path}: malformed line {n}: 'eval' is not an object")
        records.append(record)
    return records


class MetricsLog:
    """Rank 0's metrics log of one run (the other ranks get a log that writes nothing).

    `resume_step`: None starts a new log (an older one in the folder is replaced); k keeps the
    records of steps ≤ k, one per step, and appends after them."""

    def __init__(self, out: Path, *, enabled: bool = True, resume_step: Optional[int] = None) -> None:
        self.path = Path(out) / METRICS
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: dict[int, dict] = {}
        if resume_step is not None and self.path.is_file():
            for record in read_metrics_lines(self.path):
                if record["step"] <= resume_step:
                    kept[record["step"]] = {**kept.get(record["step"], {}), **record}
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(_line(kept[s]) for s in sorted(kept)), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def json_safe(value: Any) -> Any:
    """Floats rounded to 7 significant digits, NaN/inf → None (JSON has neither: a diverged
    loss is logged as null), containers recursively."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plain_options(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A run config (dataclass) as JSON values: paths as strings, tuples as lists."""
    items = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {k: _plain(v) for k, v in items.items() if k not in exclude}


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def package_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_commit() -> Optional[str]:
    """The git commit of the ovsam source tree, when it runs from a checkout (else None)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() + ("-dirty" if dirty else "")


def write_run_config(out: Path, command: str, cfg: Any, *, weights: Mapping[str, Optional[Path]],
                     world_size: int = 1, extra: Optional[Mapping[str, Any]] = None,
                     exclude: tuple[str, ...] = ()) -> Path:
    """`OUT/config.json`: every option, the versions, the weight files with their sha256, the
    commit. Rewritten by each (resumed) run of the same folder; written atomically."""
    from ..weights import sha256_of

    path = Path(out) / CONFIG
    record = {
        "command": command,
        "model": getattr(cfg, "model", None),
        "options": plain_options(cfg, exclude),
        "weights": {name: {"path": str(p), "sha256": sha256_of(Path(p))} for name, p in weights.items()
                    if p is not None},
        "versions": package_versions(),
        "commit": source_commit(),
        "world_size": world_size,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }
    write_json_atomic(path, record, indent=2)
    return path
