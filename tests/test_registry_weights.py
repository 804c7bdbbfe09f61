"""Registry contents and the weights cache: valid / corrupted cache, corrupted download, wrong
hash, offline, overrides, prompt-encoder extraction, CLIP cache lookup. Network is mocked."""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ovsam_model import registry, weights
from ovsam_model.registry import MODEL_REGISTRY, WeightFile, get_spec
from ovsam_model.weights import WeightsError, fetch_file, resolve_weights

# --- registry ------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert set(MODEL_REGISTRY) == {"ovsam-rn50x16-coco", "ovsam-rn50x16-lvis", "ovsam-rn50x16-demo",
                                   "baseline-image-crop", "baseline-feature-crop", "tiny", "tiny-256"}
    with pytest.raises(KeyError) as err:
        get_spec("ovsam-rn50")
    for name in MODEL_REGISTRY:
        assert name in str(err.value)


def test_registry_settings_per_checkpoint():
    coco, lvis, demo = (get_spec(f"ovsam-rn50x16-{n}") for n in ("coco", "lvis", "demo"))
    assert (coco.config.roi_size, lvis.config.roi_size, demo.config.roi_size) == (12, 7, 7)
    for spec in (coco, lvis, demo):
        assert (spec.config.alpha, spec.config.beta) == (0.1, 0.9)
        assert (spec.clip_model, spec.clip_pretrained, spec.clip_quick_gelu) == ("RN50x16", "openai", True)
        assert spec.preprocessing.mean == (123.675, 116.28, 103.53)
        assert spec.components[0] == "sam2clip" and spec.components[-1] == "prompt_encoder"
    assert (coco.vocabulary, coco.train_vocabulary) == ("coco", "coco-base")
    assert (lvis.vocabulary, lvis.train_vocabulary) == ("lvis", "lvis-base")
    assert demo.components == ("sam2clip", "head", "fpn", "text_embeddings", "prompt_encoder")
    assert demo.file("fpn").targets == (("fpn_neck.", "fpn"), ("roi_conv.", "head.roi_conv"))
    assert coco.file("clip2sam").targets == (("fpn_neck.", "fpn"), ("mask_decoder.", "head"))
    assert coco.file("sam2clip").url == \
        "https://huggingface.co/HarborYuan/ovsam_models/resolve/main/sam2clip_vith_rn50x16.pth"
    assert demo.file("head").url.startswith("https://huggingface.co/spaces/HarborYuan/ovsam/resolve/main/models/")
    pe = coco.file("prompt_encoder")
    assert pe.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert pe.extract_to and pe.targets == (("prompt_encoder.", "prompt_encoder"),)
    tiny = get_spec("tiny")
    assert tiny.files == () and tiny.clip_pretrained is None and tiny.train_vocabulary == "coco-base"
    with pytest.raises(KeyError, match="no weight component 'head'"):
        coco.file("head")


def test_registry_checksums_match_the_published_records(keys_dir):
    """sha256/size in the registry equal the LFS records in the layout JSONs."""
    files = {wf.filename: wf for spec in MODEL_REGISTRY.values() for wf in spec.files}
    checked = 0
    for path in keys_dir.glob("*.json"):
        rec = json.loads(path.read_text()).get("released_file") or {}
        name = json.loads(path.read_text()).get("file")
        if name in files and isinstance(rec.get("bytes"), int):
            assert files[name].size == rec["bytes"], name
            assert files[name].sha256 == rec["sha256"], name
            checked += 1
    assert checked == 5
    assert files["clip2sam_lvis_rn50x16.pth"].sha256 is None


def test_baseline_sam_variants():
    spec = get_spec("baseline-feature-crop")
    assert spec.sam_variant == "vit_h" and spec.file("sam").filename == "sam_vit_h_4b8939.pth"
    vit_b = registry.with_sam_variant(spec, "vit_b")
    assert vit_b.file("sam").url.endswith("/sam_vit_b_01ec64.pth") and vit_b.sam_variant == "vit_b"
    assert registry.with_sam_variant(spec, "vit_l").file("sam").filename == "sam_vit_l_0b3195.pth"
    with pytest.raises(ValueError):
        registry.with_sam_variant(spec, "vit_x")
    with pytest.raises(ValueError):
        registry.with_sam_variant(get_spec("ovsam-rn50x16-coco"), "vit_b")


# --- cache / download ----------------------------------------------------------------------

CONTENT = b"ovsam weights " * 5000
SHA = hashlib.sha256(CONTENT).hexdigest()


class FakeNet:
    """Stands in for `weights._open_url`: serves `body` (or raises `error`) and counts calls."""

    def __init__(self, body: bytes = CONTENT, error: Exception | None = None):
        self.body, self.error, self.calls = body, error, []

    def __call__(self, url: str):
        self.calls.append(url)
        if self.error is not None:
            raise self.error
        resp = io.BytesIO(self.body)
        resp.headers = {"Content-Length": str(len(self.body))}
        return resp


@pytest.fixture
def net(monkeypatch):
    fake = FakeNet()
    monkeypatch.setattr(weights, "_open_url", fake)
    return fake


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("OVSAM_CACHE_DIR", "OVSAM_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def wf_(sha256: str | None = SHA, size: int | None = len(CONTENT), name: str = "clip2sam_coco_rn50x16.pth"):
    return WeightFile(component="clip2sam", filename=name, url=f"https://example.invalid/{name}",
                      sha256=sha256, size=size, targets=(("fpn_neck.", "fpn"),))


def leftovers(cache: Path) -> list[str]:
    """The cache's files, less the (empty, persistent) lock files of `weights._cache_lock`."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if not (p.name.startswith(".") and p.name.endswith(".lock")))


def test_valid_cache_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_open_url", FakeNet(error=AssertionError("network used")))
    (tmp_path / "clip2sam_coco_rn50x16.pth").write_bytes(CONTENT)
    assert fetch_file(wf_(), cache_dir=tmp_path) == tmp_path / "clip2sam_coco_rn50x16.pth"


def test_download_then_cache_hit_verified_by_sidecar(tmp_path, net):
    wf = wf_(sha256=None, size=None)
    path = fetch_file(wf, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == CONTENT and len(net.calls) == 1
    assert (tmp_path / (path.name + ".sha256")).read_text().split()[0] == SHA
    assert leftovers(tmp_path) == [path.name, path.name + ".sha256"]
    assert fetch_file(wf, cache_dir=tmp_path, offline=True) == path and len(net.calls) == 1
    # the recorded checksum catches later corruption, even though the registry knows none
    path.write_bytes(CONTENT[:-1] + b"X")
    with pytest.raises(WeightsError, match="is corrupt"):
        fetch_file(wf, cache_dir=tmp_path, offline=True)


def test_corrupted_cache_is_downloaded_again(tmp_path, net):
    target = tmp_path / "clip2sam_coco_rn50x16.pth"
    target.write_bytes(CONTENT[:-1] + b"!")
    assert fetch_file(wf_(), cache_dir=tmp_path, progress=False) == target
    assert target.read_bytes() == CONTENT and len(net.calls) == 1


def test_corrupted_cache_offline_is_an_error(tmp_path, net):
    (tmp_path / "clip2sam_coco_rn50x16.pth").write_bytes(b"short")
    with pytest.raises(WeightsError) as err:
        fetch_file(wf_(), cache_dir=tmp_path, offline=True, model="ovsam-rn50x16-coco")
    msg = str(err.value)
    assert "clip2sam_coco_rn50x16.pth" in msg and "corrupt" in msg and str(tmp_path) in msg
    assert "\n" not in msg and net.calls == []


@pytest.mark.parametrize("body", [CONTENT[:-1] + b"?", CONTENT + b"extra"], ids=["wrong-hash", "wrong-size"])
def test_corrupted_download_leaves_nothing(tmp_path, monkeypatch, body):
    monkeypatch.setattr(weights, "_open_url", FakeNet(body=body))
    with pytest.raises(WeightsError, match="nothing was saved"):
        fetch_file(wf_(), cache_dir=tmp_path, progress=False)
    assert leftovers(tmp_path) == []
    # wrong hash only (size unknown)
    monkeypatch.setattr(weights, "_open_url", FakeNet(body=CONTENT[:-1] + b"?"))
    with pytest.raises(WeightsError, match=f"expected {SHA}"):
        fetch_file(wf_(size=None), cache_dir=tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_network_failure_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_open_url", FakeNet(error=urllib.error.URLError("Name or service not known")))
    with pytest.raises(WeightsError) as err:
        fetch_file(wf_(), cache_dir=tmp_path, progress=False, model="ovsam-rn50x16-coco")
    msg = str(err.value)
    assert msg.startswith("cannot download clip2sam_coco_rn50x16.pth") and "Name or service not known" in msg
    assert "--checkpoint clip2sam=PATH" in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


def test_offline_with_nothing_cached(tmp_path, net, monkeypatch):
    monkeypatch.setenv("OVSAM_OFFLINE", "1")
    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path / "c"))
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_spec("ovsam-rn50x16-coco"), components=["clip2sam"])
    assert str(err.value) == (
        f"missing weight file clip2sam_coco_rn50x16.pth (component clip2sam of ovsam-rn50x16-coco): "
        f"not in {tmp_path / 'c'} and offline; run `ovsam weights download ovsam-rn50x16-coco` where "
        f"there is network, or pass --checkpoint clip2sam=PATH")
    assert net.calls == []


def test_overrides(tmp_path, net):
    own = tmp_path / "mine.pth"
    own.write_bytes(b"anything")
    spec = get_spec("ovsam-rn50x16-coco")
    got = resolve_weights(spec, cache_dir=tmp_path / "c", offline=True, overrides={"clip2sam": own},
                          components=["clip2sam"])
    assert got == {"clip2sam": own} and net.calls == []
    with pytest.raises(WeightsError, match="--checkpoint clip2sam=.*nope.pth: no such file"):
        resolve_weights(spec, overrides={"clip2sam": tmp_path / "nope.pth"}, components=["clip2sam"])
    with pytest.raises(WeightsError, match="has no weight component 'fpn'"):
        resolve_weights(spec, overrides={"fpn": own})
    # a mistyped path is named first, not an offline cache miss of a component listed before it
    with pytest.raises(WeightsError, match="--checkpoint clip2sam=.*nope.pth: no such file"):
        resolve_weights(spec, cache_dir=tmp_path / "c", offline=True, overrides={"clip2sam": tmp_path / "nope.pth"})
    with pytest.raises(WeightsError, match="--clip-weights .*nope.bin: no such file"):
        weights.resolve_model_weights(spec, cache_dir=tmp_path / "c", offline=True, clip_weights=tmp_path / "nope.bin")


def test_resolve_all_components_in_load_order(tmp_path, monkeypatch):
    spec = get_spec("ovsam-rn50x16-demo")
    for wf in spec.files:
        (tmp_path / wf.cache_name).write_bytes(b"x")
    spec = replace(spec, files=tuple(replace(wf, sha256=None, size=None) for wf in spec.files))
    got = resolve_weights(spec, cache_dir=tmp_path, offline=True)
    assert list(got) == list(spec.components)
    assert got["prompt_encoder"] == tmp_path / "sam_vit_h_prompt_encoder.pth"


def test_cache_dir_and_offline_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.resolve_cache_dir(None) == tmp_path / ".cache" / "ovsam"
    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path / "env"))
    assert weights.resolve_cache_dir(None) == tmp_path / "env"
    assert weights.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert weights.is_offline(None) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.is_offline(None) is True and weights.is_offline(False) is False


# --- SAM prompt encoder extraction ----------------------------------------------------------

def _fake_sam_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"image_encoder.pos_embed": torch.randn(1, 4, 4, 8),
                "prompt_encoder.point_embeddings.0.weight": torch.randn(1, 256),
                "prompt_encoder.not_a_point_embed.weight": torch.randn(1, 256),
                "mask_decoder.iou_token.weight": torch.randn(1, 256)}, buf)
    return buf.getvalue()


def test_prompt_encoder_is_extracted_once(tmp_path, monkeypatch):
    fake = FakeNet(body=_fake_sam_bytes())
    monkeypatch.setattr(weights, "_open_url", fake)
    path = weights.prompt_encoder_file(cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "sam_vit_h_prompt_encoder.pth"
    small = torch.load(path, weights_only=True)
    assert sorted(small) == ["prompt_encoder.not_a_point_embed.weight", "prompt_encoder.point_embeddings.0.weight"]
    assert fake.calls == ["https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"]
    # the 2.4 GB file is not kept; later calls need neither it nor the network
    assert leftovers(tmp_path) == ["sam_vit_h_prompt_encoder.pth", "sam_vit_h_prompt_encoder.pth.sha256"]
    assert weights.prompt_encoder_file(cache_dir=tmp_path, offline=True) == path and len(fake.calls) == 1


def test_prompt_encoder_from_a_cached_full_sam_file(tmp_path, net):
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(_fake_sam_bytes())
    path = weights.prompt_encoder_file(cache_dir=tmp_path, offline=True)
    assert len(torch.load(path, weights_only=True)) == 2 and net.calls == []
    assert (tmp_path / "sam_vit_h_4b8939.pth").exists()  # the user's file is kept


def test_prompt_encoder_offline_missing(tmp_path, net):
    with pytest.raises(WeightsError, match=r"missing weight file sam_vit_h_prompt_encoder\.pth .*sam_vit_h_4b8939\.pth"):
        weights.prompt_encoder_file(cache_dir=tmp_path, offline=True)


# --- CLIP weights (open_clip's cache) -------------------------------------------------------

@pytest.fixture
def empty_clip_caches(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "ovsam"


def test_clip_pretrained_arg(empty_clip_caches, tmp_path):
    spec = get_spec("ovsam-rn50x16-coco")
    cache = empty_clip_caches
    assert weights.clip_pretrained_arg(get_spec("tiny")) is None
    assert weights.clip_pretrained_arg(spec, offline=False, cache_dir=cache) == "openai"
    with pytest.raises(WeightsError, match=r"CLIP weights RN50x16/openai .* offline; .*--clip-weights FILE"):
        weights.clip_pretrained_arg(spec, offline=True, cache_dir=cache)
    own = tmp_path / "rn50x16.bin"
    own.write_bytes(b"x")
    assert weights.clip_pretrained_arg(spec, clip_weights=own, offline=True) == str(own)
    with pytest.raises(WeightsError, match="--clip-weights .*: no such file"):
        weights.clip_pretrained_arg(spec, clip_weights=tmp_path / "none.bin")

    # a file in the Hugging Face hub layout under <cache>/open_clip is found without network
    repo = weights.clip_cache_dir(cache) / "models--timm--resnet50x16_clip.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"w")
    assert weights.clip_pretrained_arg(spec, offline=True, cache_dir=cache) == str(snap / "open_clip_pytorch_model.bin")


def test_download_clip_goes_through_open_clip(empty_clip_caches, monkeypatch):
    import open_clip.pretrained

    seen = {}

    def fake_download(cfg, cache_dir=None, prefer_hf_hub=True):
        seen.update(cfg=cfg, cache_dir=cache_dir)
        return str(Path(cache_dir) / "w.bin")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    got = weights.download_clip(get_spec("ovsam-rn50x16-coco"), cache_dir=empty_clip_caches)
    assert seen["cfg"]["hf_hub"] == "timm/resnet50x16_clip.openai/"
    assert Path(seen["cache_dir"]) == empty_clip_caches / "open_clip" and got.name == "w.bin"

    def broken(cfg, cache_dir=None, prefer_hf_hub=True):
        raise RuntimeError("Failed to download file\nsecond line")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", broken)
    with pytest.raises(WeightsError, match=r"^cannot download CLIP weights RN50x16/openai: Failed to download file;"):
        weights.download_clip(get_spec("ovsam-rn50x16-coco"), cache_dir=empty_clip_caches)


# --- resolve_model_weights: the one place the builders and training commands get weights from ---

def test_resolve_model_weights_paths_clip_and_hashes(empty_clip_caches, tmp_path, net):
    spec = get_spec("ovsam-rn50x16-coco")
    mine = {c: tmp_path / f"{c}.pth" for c in spec.components}
    for c, path in mine.items():
        path.write_bytes(c.encode())
    clip = tmp_path / "rn50x16.bin"
    clip.write_bytes(b"clip")
    got = weights.resolve_model_weights(spec, cache_dir=empty_clip_caches, offline=True, overrides=mine,
                                        clip_weights=clip)
    assert got.paths == mine and list(got.paths) == list(spec.components)
    assert got.clip_pretrained == str(clip) and got.clip_cache_dir == weights.clip_cache_dir(empty_clip_caches)
    assert got.clip_identity == "sha256:" + hashlib.sha256(b"clip").hexdigest()  # the file's, not its path
    assert got.sha256 == {c: hashlib.sha256(c.encode()).hexdigest() for c in spec.components}
    # no --clip-weights: the tag (open_clip downloads it); tiny: random CLIP, nothing to name
    tagged = weights.resolve_model_weights(spec, cache_dir=empty_clip_caches, offline=False, overrides=mine)
    assert (tagged.clip_pretrained, tagged.clip_identity) == ("openai", "openai")
    tiny = weights.resolve_model_weights(get_spec("tiny"), offline=True)
    assert (tiny.paths, tiny.clip_pretrained, tiny.clip_cache_dir, tiny.clip_identity) == ({}, None, None, None)
    assert net.calls == []


def test_resolve_model_weights_components_and_extra_files(empty_clip_caches, tmp_path, net):
    """Training runs: a subset of the spec's files, any overridden one, and files outside the spec."""
    spec = get_spec("ovsam-rn50x16-coco")
    own = tmp_path / "own.pth"
    own.write_bytes(b"x")
    extra = [registry.sam_decoder_weight("vit_h")]
    got = weights.resolve_model_weights(spec, cache_dir=tmp_path / "c", offline=True, components=[],
                                        overrides={"clip2sam": own, "sam_decoder": own}, extra_files=extra,
                                        clip_weights=own)
    assert got.paths == {"clip2sam": own, "sam_decoder": own}
    with pytest.raises(WeightsError, match=r"missing weight file sam_vit_h_mask_decoder\.pth"):
        weights.resolve_model_weights(spec, cache_dir=tmp_path / "c", offline=True, components=["sam_decoder"],
                                      extra_files=extra, clip_weights=own)
    with pytest.raises(WeightsError, match="has no weight component 'sam_decoder'"):
        weights.resolve_model_weights(spec, offline=True, overrides={"sam_decoder": own}, components=[])
    with pytest.raises(WeightsError, match="not in open_clip's cache"):
        weights.resolve_model_weights(spec, cache_dir=empty_clip_caches, offline=True, components=[])
    assert net.calls == []


def test_build_sam_variants():
    from ovsam_model.builder import build_sam

    sam = build_sam("tiny")
    assert type(sam).__name__ == "Sam" and sam.prompt_encoder.embed_dim == 32
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        build_sam("vit_x")
    with pytest.raises(ValueError, match="random weights only"):
        build_sam("tiny", "sam.pth")


class SlowNet(FakeNet):
    """A FakeNet whose responses take a while, so that concurrent fetches overlap."""

    def __call__(self, url: str):
        resp = super().__call__(url)
        time.sleep(0.3)
        return resp


def test_concurrent_fetches_of_one_file_download_it_once(tmp_path, monkeypatch):
    """Four fetches of the same missing file at once (as torchrun ranks of `ovsam label`): one
    downloads, the others wait for the cache lock and then find it cached and verified.
    (flock locks conflict between separate opens, so threads stand in for processes.)"""
    fake = SlowNet()
    monkeypatch.setattr(weights, "_open_url", fake)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: fetch_file(wf_(), cache_dir=tmp_path, progress=False), range(4)))
    assert paths == [tmp_path / "clip2sam_coco_rn50x16.pth"] * 4
    assert len(fake.calls) == 1
    assert paths[0].read_bytes() == CONTENT
    assert leftovers(tmp_path) == ["clip2sam_coco_rn50x16.pth", "clip2sam_coco_rn50x16.pth.sha256"]


def test_a_read_only_cache_is_read_without_a_lock(tmp_path, monkeypatch):
    """A cache the user may not write to (a shared read-only copy) still serves its files."""
    monkeypatch.setattr(weights, "_open_url", FakeNet(error=AssertionError("network used")))
    (tmp_path / "clip2sam_coco_rn50x16.pth").write_bytes(CONTENT)
    (tmp_path / "clip2sam_coco_rn50x16.pth.sha256").write_text(f"{SHA}  clip2sam_coco_rn50x16.pth\n")
    real_open = open

    def no_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_lock_files)
    assert fetch_file(wf_(), cache_dir=tmp_path, offline=True) == tmp_path / "clip2sam_coco_rn50x16.pth"


@pytest.mark.parametrize("content", ["random bytes", "wrong keys"])
def test_a_clip_weights_file_open_clip_cannot_load_is_one_checkpoint_error(tmp_path, content):
    """A corrupt or foreign --clip-weights file: one line naming it, not open_clip's traceback."""
    from ovsam_model.checkpoint import CheckpointError
    from ovsam_model.config import ClipConfig
    from ovsam_model.modeling.clip_trunk import ClipTrunk

    bad = tmp_path / "clip.bin"
    if content == "random bytes":
        bad.write_bytes(bytes(range(256)) * 64)
    else:
        torch.save({"not.a.clip.key": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=r"^CLIP weights .*clip\.bin: cannot load them into open_clip's RN50 \(") \
            as info:
        ClipTrunk(ClipConfig(name="RN50"), pretrained=str(bad))
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
