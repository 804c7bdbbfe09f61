"""Vocabularies: built-ins, split rule, files, imported embeddings, cached text embeddings, seen mask."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from ovsam_model import vocab as V
from ovsam_model.splits import COCO_BASE, COCO_NOVEL, coco_split_ids, lvis_split_ids

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
EMB = DATA / "clip-text-embeddings"
needs_data = pytest.mark.skipif(not EMB.is_dir(), reason=f"real test data not found at {DATA}")


# ---------------------------------------------------------------- split rule


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tape_(sticky_cloth_or_paper)", ["tape (sticky cloth", "paper)"]),
        ("salad_plate/side_plate", ["salad plate", "side plate"]),
        ("cd_player_or_dvd_player", ["cd player", "dvd player"]),
        ("Traffic_Light", ["traffic light"]),
        ("  dog , puppy,,  hound ", ["dog", "puppy", "hound"]),
        ("dog, Dog", ["dog"]),
    ],
)
def test_split_rule(text: str, expected: list[str]) -> None:
    assert V.split_synonyms(text) == expected


# ---------------------------------------------------------------- built-in vocabularies


@needs_data
def test_builtin_category_lists_match_sources() -> None:
    coco = json.loads((DATA / "coco-val2017-mini" / "instances.json").read_text())["categories"]
    v = V.load_vocabulary("coco")
    assert v.category_ids == [c["id"] for c in coco] and v.class_names == [c["name"] for c in coco]
    assert len(v) == 80 and max(v.category_ids) == 90
    lvis = json.loads((EMB / "lvis_v1_train_cat_info.json").read_text())
    lv = V.load_vocabulary("lvis")
    assert lv.category_ids == list(range(1, 1204)) == [c["id"] for c in lvis]
    assert lv.class_names == [c["name"] for c in lvis]
    assert lv.frequencies == [c["frequency"] for c in lvis]


def test_lvis_single_names_only_tape_splits() -> None:
    v = V.load_vocabulary("lvis")
    multi = [(v.category_ids[i], s) for i, s in enumerate(v.synonyms) if len(s) > 1]
    assert multi == [(1061, ["tape (sticky cloth", "paper)"])]
    assert v.synonyms[0] == ["aerosol can"]


def test_lvis_synonyms_vocabulary() -> None:
    v = V.load_vocabulary("lvis-synonyms")
    cats = V.lvis_categories()
    assert v.synonyms[0] == ["aerosol can", "spray can"]
    # bull's only listed synonym is horned_cow: the name comes first
    i = v.category_ids.index(162)
    assert v.synonyms[i] == ["bull", "horned cow"]
    assert max(len(s) for s in v.synonyms) == max(len(c["synonyms"]) for c in cats)


def test_open_vocabulary_subsets() -> None:
    coco = V.coco_categories()
    base_ids, novel_ids = coco_split_ids(coco)
    ov, base = V.load_vocabulary("coco-ov"), V.load_vocabulary("coco-base")
    assert len(ov) == 65 and sorted(ov.category_ids) == sorted(base_ids + novel_ids)
    assert len(base) == 48 and sorted(base.category_ids) == sorted(base_ids)
    assert ov.category_ids == sorted(ov.category_ids)  # dataset order kept
    lvis_base, _ = lvis_split_ids(V.lvis_categories())
    lb = V.load_vocabulary("lvis-base")
    assert len(lb) == 866 and lb.category_ids == lvis_base
    assert set(lb.frequencies) == {"f", "c"}


def test_seen_mask_coco_model() -> None:
    v = V.load_vocabulary("coco")
    seen = V.seen_mask(v, V.load_vocabulary("coco-base"))
    assert seen.dtype == torch.bool and seen.shape == (80,)
    assert sorted(n for n, s in zip(v.class_names, seen.tolist()) if s) == sorted(COCO_BASE)
    # plain names work too, and novel classes stay unseen
    seen2 = V.seen_mask(v, list(COCO_BASE))
    assert torch.equal(seen, seen2)
    assert not any(seen[v.class_names.index(n)] for n in COCO_NOVEL)


def test_seen_mask_lvis_is_frequent_plus_common() -> None:
    v = V.load_vocabulary("lvis")
    seen = V.seen_mask(v, V.load_vocabulary("lvis-base"))
    assert seen.tolist() == [f != "r" for f in v.frequencies]


# ---------------------------------------------------------------- files and errors


def test_text_file_parsing(tmp_path: Path) -> None:
    f = tmp_path / "my_classes.txt"
    f.write_text("# my classes\n\nTraffic light, stoplight\n  car  \n# comment\nsofa/couch\n\n")
    v = V.load_vocabulary(str(f))
    assert v.name == "my_classes"
    assert v.class_names == ["Traffic light", "car", "sofa/couch"]
    assert v.synonyms == [["traffic light", "stoplight"], ["car"], ["sofa", "couch"]]
    assert v.category_ids == [1, 2, 3] and v.embeddings is None


@pytest.mark.parametrize("first_line", ["", "# COCO classes\n"])
def test_names_file_with_bom_and_crlf_reads_as_plain(tmp_path: Path, first_line: str) -> None:
    """A names file saved by Windows Notepad (UTF-8 BOM, CRLF) gives exactly the same classes."""
    lines = [c["name"] for c in V.coco_categories()] + ["salad_plate/side_plate", "cd_player_or_dvd_player"]
    text = first_line + "\n".join(lines) + "\n"
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes(text.encode("utf-8"))
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert windows.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in windows.read_bytes()
    names, synonyms = V.read_names_file(plain)
    assert names[0] == "person" and len(names) == 82
    assert V.read_names_file(windows) == (names, synonyms)
    a, b = V.load_vocabulary(plain), V.load_vocabulary(windows)
    assert (a.class_names, a.synonyms, a.category_ids) == (b.class_names, b.synonyms, b.category_ids)
    # and a names file for imported embeddings
    npy = tmp_path / "emb.npy"
    np.save(npy, np.ones((82, 4), np.float32))
    assert V.load_vocabulary(npy, names_file=windows).class_names == names


def test_names_file_not_utf8_says_so(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        V.read_names_file(f)


def test_text_file_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="line 1"):
        V.load_vocabulary(dup)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no class names"):
        V.load_vocabulary(empty)


def test_bad_spec_lists_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        V.load_vocabulary("objects365")
    msg = str(e.value)
    assert "\n" not in msg and "coco" in msg and ".txt" in msg and ".npy" in msg and ".pth" in msg
    with pytest.raises(ValueError, match="not found"):
        V.load_vocabulary(str(tmp_path / "missing.txt"))


def test_npy_with_names_file_and_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 16)) * 5).astype(np.float16)
    npy = tmp_path / "mine.npy"
    np.save(npy, arr)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nzebra_crossing\n")
    v = V.load_vocabulary(str(npy), names_file=names)
    assert v.class_names == ["cat", "dog", "zebra_crossing"] and v.category_ids == [1, 2, 3]
    assert v.synonyms[2] == ["zebra crossing"]
    assert v.embeddings.shape == (3, 1, 16) and v.embeddings.dtype == torch.float32
    ref = arr.astype(np.float64) / np.linalg.norm(arr.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(v.embeddings[:, 0].numpy(), ref, atol=1e-6)
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"3 class embeddings.*2 names"):
        V.load_vocabulary(npy, names_file=names)
    with pytest.raises(ValueError, match="names file"):
        V.load_vocabulary(npy)  # K = 3: neither COCO nor LVIS


def test_pth_bare_tensor_defaults_to_lvis(tmp_path: Path) -> None:
    t = torch.randn(1203, 2, 8) * 3
    f = tmp_path / "RN50x16_LVISV1Dataset.pth"
    torch.save(t, f)
    v = V.load_vocabulary(f)
    assert v.category_ids == list(range(1, 1204)) and v.class_names[0] == "aerosol_can"
    assert v.embeddings.shape == (1203, 2, 8)
    torch.testing.assert_close(v.embeddings.norm(dim=-1), torch.ones(1203, 2))
    torch.testing.assert_close(v.embeddings, t / t.norm(dim=-1, keepdim=True))
    small = tmp_path / "small.pt"
    torch.save(torch.randn(2, 1, 8), small)
    names = tmp_path / "n.txt"
    names.write_text("a\nb\n")
    assert V.load_vocabulary(small, names_file=names).class_names == ["a", "b"]


@needs_data
def test_real_npy_defaults_by_class_count() -> None:
    coco = V.load_vocabulary(EMB / "coco_clip_a+cname.npy")
    assert coco.category_ids == V.load_vocabulary("coco").category_ids
    assert coco.embeddings.shape == (80, 1, 512)
    lvis = V.load_vocabulary(str(EMB / "lvis_v1_clip_a+cname.npy"))
    assert lvis.category_ids == list(range(1, 1204)) and lvis.embeddings.shape == (1203, 1, 512)


# ---------------------------------------------------------------- text embeddings


class CountingEncoder:
    """Deterministic fake text encoder: a fixed random vector per distinct text (not normalised)."""

    def __init__(self, dim: int = 8, cache_key: str | None = "fake-v1") -> None:
        self.dim, self.cache_key, self.calls, self.texts = dim, cache_key, 0, []

    def vec(self, text: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)) % (2**31))
        return torch.randn(self.dim, generator=g) * 3.0

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        self.texts += list(texts)
        return torch.stack([self.vec(t) for t in texts])


def test_text_embeddings_formula_and_padding() -> None:
    vocab = V.Vocabulary(
        "t", ["cat", "car", "dog"], [["cat", "kitty", "feline"], ["car"], ["dog", "puppy"]], [1, 2, 3]
    )
    enc = CountingEncoder(cache_key=None)
    templates = ("a photo of a {}.", "There is a {} in the scene.")
    emb = V.text_embeddings(vocab, enc, templates=templates, cache_dir=None)
    assert emb.shape == (3, 3, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 3))
    # hand computation for one synonym
    vs = [enc.vec(t.format("kitty")) for t in templates]
    mean = [sum(v[d].item() / math.sqrt(sum(x * x for x in v.tolist())) for v in vs) / 2 for d in range(8)]
    norm = math.sqrt(sum(m * m for m in mean))
    torch.testing.assert_close(emb[0, 1], torch.tensor([m / norm for m in mean]), atol=1e-6, rtol=0)
    # padding repeats the first synonym
    assert torch.equal(emb[1, 1], emb[1, 0]) and torch.equal(emb[1, 2], emb[1, 0])
    assert torch.equal(emb[2, 2], emb[2, 0]) and not torch.allclose(emb[2, 2], emb[2, 1])
    assert not torch.allclose(emb[0, 0], emb[0, 1])


def test_text_embedding_cache(tmp_path: Path) -> None:
    vocab = V.Vocabulary("t", ["cat", "dog"], [["cat"], ["dog", "puppy"]], [1, 2])
    enc = CountingEncoder()
    first = V.text_embeddings(vocab, enc, cache_dir=tmp_path)
    assert enc.calls == 1 and len(enc.texts) == 3 * len(V.TEMPLATES)
    files = list((tmp_path / "text_embeddings").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "text_embeddings").glob("*.tmp"))
    again = V.text_embeddings(vocab, enc, cache_dir=tmp_path)
    assert enc.calls == 1 and torch.equal(first, again)
    # other templates, other encoder or other classes → other cache entries
    V.text_embeddings(vocab, enc, templates=("a {}",), cache_dir=tmp_path)
    assert enc.calls == 2
    V.text_embeddings(vocab, CountingEncoder(cache_key="fake-v2"), cache_dir=tmp_path)
    V.text_embeddings(V.Vocabulary("u", ["cat"], [["cat"]], [1]), enc, cache_dir=tmp_path)
    assert len(list((tmp_path / "text_embeddings").glob("*.pt"))) == 4
    # no cache key → never cached
    nokey = CountingEncoder(cache_key=None)
    V.text_embeddings(vocab, nokey, cache_dir=tmp_path)
    V.text_embeddings(vocab, nokey, cache_dir=tmp_path)
    assert nokey.calls == 2
    # a damaged cache entry is recomputed, not trusted
    files[0].write_bytes(b"garbage")
    enc.calls = 0
    torch.testing.assert_close(V.text_embeddings(vocab, enc, cache_dir=tmp_path), first)
    assert enc.calls == 1


def tiny_open_clip() -> V.OpenClipTextEncoder:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=384, layers=[1, 1, 1, 1], width=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
    ).eval()
    return V.OpenClipTextEncoder(model, open_clip.get_tokenizer("RN50"), cache_key=None, batch_size=5)


def test_open_clip_adapter_and_embeddings(tmp_path: Path) -> None:
    enc = tiny_open_clip()
    assert enc.embed_dim == 64
    texts = ["a photo of a cat.", "a dog", "tape (sticky cloth", "x", "y", "z", "zebra"]
    out = enc.encode_text(texts)  # batches of 5 and 2
    with torch.no_grad():
        ref = enc.model.encode_text(open_clip.get_tokenizer("RN50")(texts))
    assert out.shape == (7, 64) and not out.requires_grad
    torch.testing.assert_close(out, ref)
    emb = V.text_embeddings(V.load_vocabulary("coco-base"), enc, cache_dir=tmp_path)
    assert emb.shape == (48, 1, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(48, 1))
    assert not (tmp_path / "text_embeddings").exists()  # cache_key None: random weights are not cached


def test_precomputed_embeddings_dimension_check(tmp_path: Path) -> None:
    emb = torch.nn.functional.normalize(torch.randn(80, 1, 32), dim=-1)
    vocab = V.load_vocabulary("coco")
    vocab.embeddings = emb
    enc = CountingEncoder(dim=32)
    enc.embed_dim = 32
    assert V.text_embeddings(vocab, enc, cache_dir=tmp_path) is emb and enc.calls == 0
    assert V.text_embeddings(vocab, None) is emb
    with pytest.raises(ValueError, match="32-d.*64-d"):
        V.text_embeddings(vocab, tiny_open_clip())
    with pytest.raises(ValueError, match="no text encoder"):
        V.text_embeddings(V.load_vocabulary("coco"), None)


def test_vocabulary_from_dataset_categories(data_dir):
    from ovsam_model.vocab import coco_categories, load_vocabulary, mismatched_categories, vocabulary_from_categories

    cats = json.loads((data_dir / "coco-val2017-mini" / "instances.json").read_text())["categories"]
    coco = vocabulary_from_categories(cats)
    assert coco.name == "coco" and coco.category_ids == [c["id"] for c in coco_categories()]
    custom = vocabulary_from_categories([{"id": 7, "name": "traffic_cone"}, {"id": 3, "name": "Forklift"}])
    assert custom.category_ids == [3, 7] and custom.synonyms == [["forklift"], ["traffic cone"]]
    assert mismatched_categories(coco, cats) == []
    lvis = load_vocabulary("lvis")
    bad = mismatched_categories(lvis, cats)  # LVIS ids written into a COCO dataset
    assert len(bad) > 1000 and bad[0].startswith("1 (")
