"""Download, cache and verify weight files; offline mode; user-supplied overrides.

Cache layout (`resolve_cache_dir`): `<cache>/<official file name>` plus `<file>.sha256`, the
sha256 recorded at download, so every later cache hit is verified without the network even
when the registry knows no checksum. CLIP weights stay in open_clip's own (Hugging Face hub)
cache, under `<cache>/open_clip` when downloaded through us.

All network access goes through `_open_url` (tests replace it). Processes that fetch the same
file at once (torchrun ranks of `ovsam label`, `--devices`, Ray actors on one node) take turns
on a lock file beside it (`_cache_lock`): one downloads, the others then find it cached.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent downloads stay safe (atomic rename), only wasteful
    fcntl = None  # type: ignore[assignment]

from ovsam_model.atomic import atomic_path, write_text_atomic
from ovsam_model.registry import ModelSpec, WeightFile, prompt_encoder_weight

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 60.0
_TRUE = {"1", "true", "yes", "on"}


class WeightsError(Exception):
    """A weight file that cannot be found, fetched or verified (one-line message)."""


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else env `OVSAM_CACHE_DIR`, else `~/.cache/ovsam`."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("OVSAM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ovsam"


def is_offline(offline: bool | None = None) -> bool:
    """`offline` if given, else env `OVSAM_OFFLINE=1` or `HF_HUB_OFFLINE=1`."""
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("OVSAM_OFFLINE", "HF_HUB_OFFLINE"))


def _open_url(url: str):
    """The one place that touches the network: a response with `.read(n)` and `.headers`."""
    req = urllib.request.Request(url, headers={"User-Agent": "ovsam"})
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def sha256_of(path: Path) -> str:
    """sha256 of a file; remembered per (path, size, mtime) so verifying a cache hit and
    reporting the weights' hashes read a 0.5 GB file once per process."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: Path) -> Optional[str]:
    """The sha256 recorded next to a cached file at download time, if any."""
    side = _sidecar(path)
    if side.is_file():
        text = side.read_text().split()
        return text[0].lower() if text else None
    return None


def _expected_sha256(wf: WeightFile, path: Path) -> Optional[str]:
    """Registry checksum of the file at `path`, else the recorded one. Extracted files have
    no registry checksum (theirs is of the full source file)."""
    known = wf.sha256 if path.name == wf.filename else None
    return known or recorded_sha256(path)


def cached_problem(wf: WeightFile, path: Path, check_hash: bool = True) -> Optional[str]:
    """Why the cached `path` cannot be trusted (size or checksum), or None if it is fine."""
    if wf.size is not None and path.name == wf.filename and path.stat().st_size != wf.size:
        return f"size {path.stat().st_size} B, expected {wf.size} B"
    expected = _expected_sha256(wf, path)
    if check_hash and expected is not None:
        digest = sha256_of(path)
        if digest != expected:
            return f"sha256 {digest[:12]}…, expected {expected[:12]}…"
    return None


def _whose(wf: WeightFile, model: Optional[str]) -> str:
    return f"component {wf.component} of {model}" if model else f"component {wf.component}"


def _how_to_provide(wf: WeightFile, model: Optional[str]) -> str:
    dl = f"`ovsam weights download {model}`" if model else "`ovsam weights download MODEL`"
    return f"run {dl} where there is network, or pass --checkpoint {wf.component}=PATH"


def _download(wf: WeightFile, dest: Path, *, model: Optional[str], progress: bool,
              expected: Optional[str]) -> Path:
    """Stream `wf.url` to a temp file next to `dest`, hashing as it goes; check size and sha256,
    then move it into place and record the sha256. Nothing is left at `dest` on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, _open_url(wf.url) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or wf.size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=wf.filename,
                      disable=not progress, file=sys.stderr, leave=False) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
        digest = h.hexdigest()
        if wf.size is not None and n != wf.size:
            raise WeightsError(f"download of {wf.filename} ({_whose(wf, model)}) from {wf.url} is "
                               f"{n} B, expected {wf.size} B; nothing was saved, try again")
        if expected is not None and digest != expected:
            raise WeightsError(f"download of {wf.filename} ({_whose(wf, model)}) from {wf.url} has sha256 "
                               f"{digest}, expected {expected}; nothing was saved")
        os.replace(tmp, dest)
        write_text_atomic(_sidecar(dest), f"{digest}  {dest.name}\n")
        return dest
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"cannot download {wf.filename} ({_whose(wf, model)}) from {wf.url}: {reason}; "
                           f"{_how_to_provide(wf, model)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch_plain(wf: WeightFile, cache: Path, *, offline: bool, model: Optional[str], progress: bool) -> Path:
    """The file `wf.filename` from the cache, verified, or downloaded into it."""
    target = cache / wf.filename
    expected = None
    if target.is_file():
        problem = cached_problem(wf, target)
        if problem is None:
            if _expected_sha256(wf, target) is None:  # copied in by hand: record it from now on
                write_text_atomic(_sidecar(target), f"{sha256_of(target)}  {target.name}\n")
            return target
        if offline:
            raise WeightsError(f"cached {wf.filename} ({_whose(wf, model)}) in {cache} is corrupt ({problem}) "
                               f"and offline; delete it and {_how_to_provide(wf, model)}")
        log.warning("cached %s is corrupt (%s); downloading it again", target, problem)
        expected = _expected_sha256(wf, target)
    elif offline:
        raise WeightsError(f"missing weight file {wf.filename} ({_whose(wf, model)}): not in {cache} and offline; "
                           f"{_how_to_provide(wf, model)}")
    return _download(wf, target, model=model, progress=progress, expected=expected or wf.sha256)


def _extract(wf: WeightFile, source: Path, dest: Path) -> Path:
    """Keep only the keys under `wf.targets` of `source` and save them to `dest` (atomic)."""
    import torch

    from ovsam_model.checkpoint import read_checkpoint

    state = read_checkpoint(source)
    prefixes = tuple(p for p, _ in wf.targets)
    small = {k: v for k, v in state.items() if k.startswith(prefixes)} if isinstance(state, dict) else {}
    if not small:
        raise WeightsError(f"{source.name} ({_whose(wf, None)}) has no keys starting with {', '.join(prefixes)}")
    with atomic_path(dest) as tmp:
        torch.save(small, tmp)
        digest = sha256_of(tmp)
    write_text_atomic(_sidecar(dest), f"{digest}  {dest.name}\n")
    return dest


def _fetch_extracted(wf: WeightFile, cache: Path, *, offline: bool, model: Optional[str], progress: bool) -> Path:
    """The small extracted file: cached, or cut from a cached / downloaded full file. A full
    file downloaded only for this is deleted afterwards."""
    target = cache / wf.cache_name
    if target.is_file():
        problem = cached_problem(wf, target)
        if problem is None:
            return target
        log.warning("cached %s is corrupt (%s); extracting it again", target, problem)
        target.unlink()
    full = cache / wf.filename
    had_full = full.is_file()
    if offline and not had_full:
        raise WeightsError(f"missing weight file {wf.cache_name} ({_whose(wf, model)}, extracted from "
                           f"{wf.filename}): neither is in {cache} and offline; {_how_to_provide(wf, model)}")
    source = _fetch_plain(wf, cache, offline=offline, model=model, progress=progress)
    try:
        return _extract(wf, source, target)
    finally:
        if not had_full:
            for p in (source, _sidecar(source)):
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def _cache_lock(cache: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on `<cache>/.<name>.lock` (waiting for it), so that one process
    at a time looks up, downloads or extracts `name`. The lock file stays (it is empty); the OS
    releases the lock of a killed process."""
    handle = None
    if fcntl is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            handle = open(cache / f".{name}.lock", "a+b")
        except OSError:  # a read-only cache (offline use of a shared copy): nothing to download into anyway
            handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fetch_file(wf: WeightFile, *, cache_dir: str | Path | None = None, offline: bool | None = None,
               override: str | Path | None = None, progress: bool = True, model: Optional[str] = None) -> Path:
    """A local path for `wf`: the `override` as is, else a verified cache hit, else a download.

    `model` only improves messages. Raises `WeightsError` (one line) when the file is missing
    offline, corrupt offline, unreachable, or fails its checksum.
    """
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise WeightsError(f"--checkpoint {wf.component}={path}: no such file")
        return path
    cache = resolve_cache_dir(cache_dir)
    with _cache_lock(cache, wf.filename):
        if wf.extract_to:
            return _fetch_extracted(wf, cache, offline=is_offline(offline), model=model, progress=progress)
        return _fetch_plain(wf, cache, offline=is_offline(offline), model=model, progress=progress)


def resolve_weights(spec: ModelSpec, *, cache_dir: str | Path | None = None, offline: bool | None = None,
                    overrides: Optional[Mapping[str, str | Path]] = None,
                    components: Optional[Iterable[str]] = None, progress: bool = True,
                    extra_files: Iterable[WeightFile] = ()) -> dict[str, Path]:
    """component → local path for the files of `spec` (all, or only `components`), in load order.

    `extra_files`: files outside the spec that a job also needs (a training run's SAM teacher
    or SAM decoder), resolved after the spec's own and named by their `component`. With
    `components`, a component that has an override is resolved too (a given file is used)."""
    overrides = dict(overrides or {})
    fetched = (*spec.files, *extra_files)
    files = (*fetched, *spec.user_files)  # user files: only when overridden
    known = [wf.component for wf in files]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise WeightsError(f"{spec.name} has no weight component {unknown[0]!r} "
                           f"(components: {', '.join(dict.fromkeys(known)) or 'none'})")
    wanted = set([wf.component for wf in fetched] if components is None else components) | set(overrides)
    wanted -= {wf.component for wf in spec.user_files} - set(overrides)
    # the user's files first: a mistyped --checkpoint path is named before any download or
    # offline cache miss of another component
    given = {wf.component: fetch_file(wf, override=overrides[wf.component]) for wf in files if wf.component in overrides}
    return {
        wf.component: given.get(wf.component) or fetch_file(wf, cache_dir=cache_dir, offline=offline,
                                                            progress=progress, model=spec.name)
        for wf in files if wf.component in wanted
    }


@dataclass(frozen=True)
class ResolvedWeights:
    """Everything a model build needs to know about its weights, resolved in one place
    (`resolve_model_weights`): no tensors are read.

    `paths`: component → local file, in load order. `clip_pretrained`: open_clip's
    `pretrained=` (a local file, or a tag for open_clip to download into `clip_cache_dir`;
    None: random CLIP). `clip_identity`: what names those CLIP weights in the text-embedding
    cache: the tag, or `sha256:<hex>` of a `--clip-weights` file (never a cache path, which
    changes between a download and later cache hits); None without pretrained CLIP.
    `sha256`: component → sha256 of its file. Both hashes are computed on first use (and
    remembered per file), so a job that never reports them never reads a large file for them.
    """

    paths: dict[str, Path] = field(default_factory=dict)
    clip_pretrained: Optional[str] = None
    clip_cache_dir: Optional[Path] = None
    clip_tag: Optional[str] = None  # the spec's open_clip tag
    clip_file: Optional[Path] = None  # a user-given --clip-weights file

    @property
    def clip_identity(self) -> Optional[str]:
        if self.clip_pretrained is None:
            return None
        return f"sha256:{sha256_of(self.clip_file)}" if self.clip_file is not None else self.clip_tag

    @property
    def sha256(self) -> dict[str, str]:
        return {component: sha256_of(path) for component, path in self.paths.items()}


def resolve_model_weights(
    spec: ModelSpec,
    *,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    overrides: Optional[Mapping[str, str | Path]] = None,
    clip_weights: str | Path | None = None,
    components: Optional[Iterable[str]] = None,
    extra_files: Iterable[WeightFile] = (),
    progress: bool = True,
    fetch_clip: bool = False,
) -> ResolvedWeights:
    """The local weight files of `spec` and its CLIP, fetched or taken from the cache or the
    user's files: the one place that turns `--cache-dir`, `--offline`, `--checkpoint` and
    `--clip-weights` into what the builders need (`build_predictor`, `ovsam distill`,
    `ovsam finetune`).

    `overrides`: component → a user file (`--checkpoint`); `extra_files`: files outside the
    spec (see `resolve_weights`); `components`: only these of the spec's and the extra files
    (plus any overridden one; default all); `clip_weights`: a local open_clip file
    (`--clip-weights`); `fetch_clip`: download the CLIP weights now when they are not cached
    (`download_clip`), so that `clip_pretrained` is a local file, not a tag that open_clip
    would download on every process of a torchrun job.
    Raises `WeightsError` (one line) for a missing, unreachable or corrupt file.
    """
    if clip_weights is not None:
        _user_clip_file(clip_weights)  # a mistyped path is named before any download
    paths = resolve_weights(spec, cache_dir=cache_dir, offline=offline, overrides=overrides, components=components,
                            progress=progress, extra_files=extra_files)
    clip_arg = clip_pretrained_arg(spec, clip_weights, offline, cache_dir)
    if fetch_clip and clip_weights is None and clip_arg is not None and clip_arg == spec.clip_pretrained:
        clip_arg = str(download_clip(spec, cache_dir))
    return ResolvedWeights(
        paths=paths,
        clip_pretrained=clip_arg,
        clip_cache_dir=clip_cache_dir(cache_dir) if clip_arg is not None else None,
        clip_tag=spec.clip_pretrained,
        clip_file=Path(clip_weights).expanduser() if clip_weights is not None and clip_arg is not None else None,
    )


def prompt_encoder_file(*, variant: str = "vit_h", cache_dir: str | Path | None = None,
                        offline: bool | None = None, override: str | Path | None = None,
                        progress: bool = True) -> Path:
    """SAM's prompt encoder weights (keys `prompt_encoder.*`) in a small cached file, extracted
    once from the full SAM checkpoint (cached full file, or a download that is then deleted)."""
    return fetch_file(prompt_encoder_weight(variant), cache_dir=cache_dir, offline=offline,
                      override=override, progress=progress)


def is_cached(wf: WeightFile, cache_dir: str | Path | None = None) -> Optional[bool]:
    """Cheap cache check (existence and size, no hashing): True, False, or None if a file is
    there with the wrong size."""
    path = resolve_cache_dir(cache_dir) / wf.cache_name
    if not path.is_file():
        return False
    if cached_problem(wf, path, check_hash=False) is not None:
        return None
    return True


# --- CLIP trunk weights (open_clip's own cache) ----------------------------------------------

def clip_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where `download_clip` puts open_clip weights: `<ovsam cache>/open_clip`."""
    return resolve_cache_dir(cache_dir) / "open_clip"


def _clip_cfg(spec: ModelSpec) -> dict:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.clip_model, spec.clip_pretrained)
    if not cfg:
        raise WeightsError(f"open_clip has no pretrained tag {spec.clip_pretrained!r} for {spec.clip_model}")
    return cfg


def cached_clip_file(spec: ModelSpec, cache_dir: str | Path | None = None) -> Optional[Path]:
    """open_clip's cached weight file for the spec's CLIP, looked up without network, in
    `<ovsam cache>/open_clip` then the default Hugging Face hub cache; None if not cached."""
    if not spec.clip_pretrained:
        return None
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = _clip_cfg(spec)
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" → default names
        names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else [filename]
        for where in (clip_cache_dir(cache_dir), None):
            for name in names:
                hit = try_to_load_from_cache(repo_id, name, cache_dir=str(where) if where else None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    if cfg.get("url"):
        for where in (clip_cache_dir(cache_dir), Path.home() / ".cache" / "clip"):
            hit = where / os.path.basename(cfg["url"])
            if hit.is_file():
                return hit
    return None


def _user_clip_file(clip_weights: str | Path) -> Path:
    """The `--clip-weights` file; `WeightsError` when there is none."""
    path = Path(clip_weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--clip-weights {path}: no such file")
    return path


def clip_pretrained_arg(spec: ModelSpec, clip_weights: str | Path | None = None, offline: bool | None = None,
                        cache_dir: str | Path | None = None) -> Optional[str]:
    """What to pass as `open_clip.create_model(..., pretrained=...)`.

    `--clip-weights FILE` → that file; a cached open_clip file → its path (no network);
    otherwise the tag (open_clip downloads it; pass `cache_dir=clip_cache_dir(...)`), or a
    `WeightsError` when offline. None for a spec without pretrained CLIP (tiny). Whenever the
    result is a file path, also pass `force_quick_gelu=spec.clip_quick_gelu`: open_clip only
    applies the tag's QuickGELU setting when given the tag.
    """
    if clip_weights is not None:
        return str(_user_clip_file(clip_weights))
    if not spec.clip_pretrained:
        return None
    hit = cached_clip_file(spec, cache_dir)
    if hit is not None:
        return str(hit)
    if is_offline(offline):
        raise WeightsError(f"CLIP weights {spec.clip_model}/{spec.clip_pretrained} of {spec.name} are not in "
                           f"open_clip's cache ({clip_cache_dir(cache_dir)} or the Hugging Face hub cache) and "
                           f"offline; run `ovsam weights download {spec.name}` where there is network, "
                           f"or pass --clip-weights FILE")
    return spec.clip_pretrained


def download_clip(spec: ModelSpec, cache_dir: str | Path | None = None) -> Optional[Path]:
    """Fetch the spec's CLIP weights into `<ovsam cache>/open_clip` through open_clip (no-op
    when already cached anywhere open_clip looks). Returns the local file."""
    if not spec.clip_pretrained:
        return None
    hit = cached_clip_file(spec, cache_dir)
    if hit is not None:
        return hit
    from open_clip.pretrained import download_pretrained

    where = clip_cache_dir(cache_dir)
    where.mkdir(parents=True, exist_ok=True)
    try:
        target = download_pretrained(_clip_cfg(spec), cache_dir=str(where))
    except Exception as e:  # open_clip wraps hub / urllib errors in several types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot download CLIP weights {spec.clip_model}/{spec.clip_pretrained}: {reason}; "
                           f"pass --clip-weights FILE instead") from None
    return Path(target)
