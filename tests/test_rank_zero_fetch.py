"""Under torchrun, weight files are downloaded by local rank 0 only; the other ranks wait, then
find them in the cache (`train.common.local_rank_zero_first`), CLIP weights included."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import socket
import time
import urllib.error
from pathlib import Path

import pytest

from ovsam_model import weights
from ovsam_model.registry import WeightFile, resolve_spec

CONTENT = b"weights " * 1000
WF = WeightFile(component="clip2sam", filename="clip2sam_test.pth", url="https://example.invalid/clip2sam_test.pth",
                sha256=hashlib.sha256(CONTENT).hexdigest(), size=len(CONTENT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, cache: str, out: str, fail: bool) -> None:
    """One torchrun-like process: fetch WF through `local_rank_zero_first` with a fake network."""
    import torch
    import torch.distributed as dist

    from ovsam_model.train import common

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cuda.is_available = lambda: False  # gloo, even on a machine with GPUs
    calls, started = [], []

    def fake_open(url: str):
        calls.append(url)
        time.sleep(0.5)  # a slow download: a rank that did not wait would start before the file exists
        if fail:
            raise urllib.error.URLError("unreachable")
        resp = io.BytesIO(CONTENT)
        resp.headers = {"Content-Length": str(len(CONTENT))}
        return resp

    weights._open_url = fake_open

    def fetch() -> Path:
        started.append((Path(cache) / WF.cache_name).is_file())
        return weights.fetch_file(WF, cache_dir=cache, progress=False)

    result = {"calls": calls, "started": started}
    try:
        path = common.local_rank_zero_first(fetch)
        result["ok"] = path.read_bytes() == CONTENT
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def _run_two(tmp_path: Path, fail: bool) -> dict[int, dict]:
    ctx = mp.get_context("fork")
    port, cache = _free_port(), tmp_path / "cache"
    procs = [ctx.Process(target=_rank, args=(r, port, str(cache), str(tmp_path), fail)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    return {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)}


def test_only_local_rank_zero_downloads_and_both_end_with_the_file(tmp_path):
    out = _run_two(tmp_path, fail=False)
    assert out[0] == {"calls": [WF.url], "started": [False], "ok": True}
    assert out[1] == {"calls": [], "started": [True], "ok": True}  # waited, then a cache hit


def test_a_failed_download_fails_every_rank_in_one_line(tmp_path):
    out = _run_two(tmp_path, fail=True)
    assert out[0]["calls"] == [WF.url] and out[0]["error"].startswith("WeightsError: cannot download clip2sam_test.pth")
    assert out[1] == {"calls": [], "started": [],
                      "error": "WeightsError: local rank 0 could not fetch the weight files (its message says why)"}


def test_single_process_just_fetches(monkeypatch):
    from ovsam_model.train import common

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert common.local_rank_zero_first(lambda: 42) == 42


def test_fetch_clip_downloads_the_tag_into_the_cache(tmp_path, monkeypatch):
    """Ranks must not each let open_clip download a tag: with fetch_clip the tag becomes the cached file."""
    spec = resolve_spec("ovsam-rn50x16-coco")
    got = tmp_path / "open_clip_model.safetensors"
    downloads = []
    monkeypatch.setattr(weights, "cached_clip_file", lambda spec, cache_dir=None: None)
    monkeypatch.setattr(weights, "download_clip", lambda spec, cache_dir=None: downloads.append(spec.name) or got)
    plain = weights.resolve_model_weights(spec, cache_dir=tmp_path, offline=False, components=[])
    assert plain.clip_pretrained == spec.clip_pretrained and downloads == []
    fetched = weights.resolve_model_weights(spec, cache_dir=tmp_path, offline=False, components=[], fetch_clip=True)
    assert fetched.clip_pretrained == str(got) and downloads == [spec.name]
    given = tmp_path / "mine.pt"
    given.write_bytes(b"x")
    mine = weights.resolve_model_weights(spec, cache_dir=tmp_path, offline=False, components=[], clip_weights=given,
                                         fetch_clip=True)
    assert mine.clip_pretrained == str(given) and downloads == [spec.name]
