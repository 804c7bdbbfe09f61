"""Vocabularies (class names, synonyms, dataset ids) and their cached CLIP text embeddings (spec §4).

A vocabulary comes from a built-in name (`coco`, `lvis`, ...), a text file of class names, or
precomputed embeddings (Detic-style `.npy` [K, D], or a bare `.pth` tensor [K, P, D] such as the
demo's `RN50x16_LVISV1Dataset.pth`). `text_embeddings` turns a vocabulary into a [K, P, D] tensor
of L2-normalised rows, computing it once per (text encoder, templates, synonyms) and caching it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import torch_save_atomic
from .splits import COCO_BASE, COCO_NOVEL

DATA_DIR = Path(__file__).resolve().parent / "data"

# The 14 ViLD-style prompt templates (punctuation as commonly distributed, e.g. in FC-CLIP).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

BUILTIN = ("coco", "lvis", "lvis-synonyms", "coco-ov", "coco-base", "lvis-base")
SPEC_HELP = (
    "vocabulary must be one of " + ", ".join(BUILTIN)
    + ", a .txt file (one class per line, synonyms separated by commas),"
    " a .npy file of [K, D] embeddings (with a names file), or a .pth/.pt tensor [K, P, D]"
)


@dataclass
class Vocabulary:
    """K classes. `synonyms[i]` are the texts encoded for class i (already split and normalised).

    embeddings: optional precomputed [K, P, D] float tensor with L2-normalised rows.
    """

    name: str
    class_names: list[str]
    synonyms: list[list[str]]
    category_ids: list[int]
    frequencies: Optional[list[str]] = None
    embeddings: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if len(self.synonyms) != k or len(self.category_ids) != k:
            raise ValueError(
                f"vocabulary {self.name!r}: {k} names, {len(self.synonyms)} synonym lists, "
                f"{len(self.category_ids)} ids"
            )
        if self.frequencies is not None and len(self.frequencies) != k:
            raise ValueError(f"vocabulary {self.name!r}: {k} names but {len(self.frequencies)} frequencies")
        if any(not s for s in self.synonyms):
            raise ValueError(f"vocabulary {self.name!r}: a class has no synonyms")
        if self.embeddings is not None and (self.embeddings.dim() != 3 or self.embeddings.shape[0] != k):
            raise ValueError(
                f"vocabulary {self.name!r}: embeddings {tuple(self.embeddings.shape)} do not match {k} classes"
            )

    def __len__(self) -> int:
        return len(self.class_names)


def split_synonyms(text: str) -> list[str]:
    """Spec §4 rule: `_or_` and `/` become `,`; split on `,`; `_` → space; lower-case; strip.

    `tape_(sticky_cloth_or_paper)` → ["tape (sticky cloth", "paper)"]. Empty pieces are dropped,
    duplicates kept once (first occurrence wins).
    """
    pieces = text.replace("_or_", ",").replace("/", ",").split(",")
    out: list[str] = []
    for p in pieces:
        p = " ".join(p.replace("_", " ").lower().split())
        if p and p not in out:
            out.append(p)
    return out


# ---------------------------------------------------------------- built-in vocabularies


@lru_cache(maxsize=None)
def _categories(which: str) -> tuple[dict, ...]:
    return tuple(json.loads((DATA_DIR / f"{which}_categories.json").read_text()))


def coco_categories() -> list[dict]:
    """The 80 COCO categories ({"id", "name", "supercategory"}), in id order."""
    return [dict(c) for c in _categories("coco")]


def lvis_categories() -> list[dict]:
    """The 1203 LVIS v1 categories ({"id", "name", "synonyms", "frequency"}), in id order."""
    return [dict(c) for c in _categories("lvis")]


def _coco_vocab(name: str, keep: Callable[[str], bool]) -> Vocabulary:
    cats = [c for c in _categories("coco") if keep(c["name"])]
    return Vocabulary(
        name=name,
        class_names=[c["name"] for c in cats],
        synonyms=[split_synonyms(c["name"]) for c in cats],
        category_ids=[int(c["id"]) for c in cats],
    )


def _lvis_vocab(name: str, *, with_synonyms: bool, base_only: bool) -> Vocabulary:
    cats = [c for c in _categories("lvis") if not base_only or c["frequency"] in ("f", "c")]
    synonyms = []
    for c in cats:
        texts = [c["name"]] + (list(c["synonyms"]) if with_synonyms else [])
        syn: list[str] = []
        for t in texts:
            syn += [s for s in split_synonyms(t) if s not in syn]
        synonyms.append(syn)
    return Vocabulary(
        name=name,
        class_names=[c["name"] for c in cats],
        synonyms=synonyms,
        category_ids=[int(c["id"]) for c in cats],
        frequencies=[c["frequency"] for c in cats],
    )


def _builtin(spec: str) -> Vocabulary:
    ov = set(COCO_BASE) | set(COCO_NOVEL)
    if spec == "coco":
        return _coco_vocab(spec, lambda n: True)
    if spec == "coco-ov":
        return _coco_vocab(spec, lambda n: n in ov)
    if spec == "coco-base":
        return _coco_vocab(spec, lambda n: n in COCO_BASE)
    if spec == "lvis":
        return _lvis_vocab(spec, with_synonyms=False, base_only=False)
    if spec == "lvis-synonyms":
        return _lvis_vocab(spec, with_synonyms=True, base_only=False)
    if spec == "lvis-base":
        return _lvis_vocab(spec, with_synonyms=False, base_only=True)
    raise ValueError(SPEC_HELP)


def vocabulary_from_categories(categories: Sequence[Mapping], name: str = "dataset") -> Vocabulary:
    """A dataset's own category list ({"id", "name", ...}) as the vocabulary.

    When the list is exactly the COCO 80 or the LVIS 1203 (same ids and names), the built-in
    vocabulary is returned (so a model's precomputed LVIS embeddings still apply); otherwise
    each name is split with the §4 rule and keeps its dataset id.
    """
    nameless = [c.get("id") for c in categories if not str(c.get("name", "")).strip()]
    if nameless:
        raise ValueError(f"{name}: category {nameless[0]} has no name (give --vocab)")
    pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    if not pairs:
        raise ValueError(f"{name}: the category list is empty")
    for builtin in ("coco", "lvis"):
        if pairs == [(int(c["id"]), c["name"]) for c in _categories(builtin)]:
            return _builtin(builtin)
    synonyms = [split_synonyms(n) or [n.strip().lower()] for _, n in pairs]
    return Vocabulary(name=name, class_names=[n for _, n in pairs], synonyms=synonyms,
                      category_ids=[i for i, _ in pairs])


def mismatched_categories(vocab: Vocabulary, categories: Sequence[Mapping]) -> list[str]:
    """Vocabulary classes whose id is missing from `categories` or names another class there
    (e.g. COCO ids written into an LVIS dataset). Empty when every id means the same class."""
    names = {int(c["id"]): split_synonyms(str(c["name"])) for c in categories}
    return [f"{cid} ({cname})" for cid, cname in zip(vocab.category_ids, vocab.class_names)
            if cid not in names or not set(names[cid]) & set(split_synonyms(cname))]


# ---------------------------------------------------------------- files


def read_names_file(path: Path) -> tuple[list[str], list[list[str]]]:
    """(display names, synonym lists) from a text file: one class per line, synonyms separated by
    commas; blank lines and lines starting with `#` are ignored. The display name is the line's
    first comma-separated field as written. UTF-8, with or without a byte-order mark; LF, CRLF or
    CR line ends (a file saved by Notepad reads exactly as one written on Linux)."""
    names: list[str] = []
    synonyms: list[list[str]] = []
    seen: dict[str, int] = {}
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # "-sig": a leading BOM is not text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); save the names file as UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        syn = split_synonyms(line)
        if not syn:
            raise ValueError(f"{path}:{lineno}: no class name on this line")
        display = line.split(",")[0].strip() or syn[0]
        if display in seen:
            raise ValueError(f"{path}:{lineno}: class {display!r} already defined on line {seen[display]}")
        seen[display] = lineno
        names.append(display)
        synonyms.append(syn)
    if not names:
        raise ValueError(f"{path}: no class names found")
    return names, synonyms


def _text_file_vocab(path: Path) -> Vocabulary:
    names, synonyms = read_names_file(path)
    return Vocabulary(path.stem, names, synonyms, list(range(1, len(names) + 1)))


def _normalise_rows(emb: torch.Tensor) -> torch.Tensor:
    return F.normalize(emb.float(), dim=-1)


def _names_for_embeddings(path: Path, k: int, names_file: Optional[Path]) -> Vocabulary:
    """Class metadata for K imported embeddings: from `names_file`, else COCO (K = 80) or LVIS (K = 1203)."""
    if names_file is not None:
        names, synonyms = read_names_file(names_file)
        if len(names) != k:
            raise ValueError(f"{path} has {k} class embeddings but {names_file} has {len(names)} names")
        return Vocabulary(path.stem, names, synonyms, list(range(1, k + 1)))
    if k == 1203:
        v = _builtin("lvis")
    elif k == 80:
        v = _builtin("coco")
    else:
        raise ValueError(f"{path} has {k} class embeddings: give a names file with {k} names")
    v.name = path.stem
    return v


def _embedding_file_vocab(path: Path, names_file: Optional[Path]) -> Vocabulary:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected a [K, D] array, got shape {arr.shape}")
        emb = torch.from_numpy(arr.astype(np.float32))[:, None, :]
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
            raise ValueError(f"{path}: expected a bare tensor [K, P, D] or [K, D]")
        emb = obj if obj.dim() == 3 else obj[:, None, :]
    vocab = _names_for_embeddings(path, int(emb.shape[0]), names_file)
    vocab.embeddings = _normalise_rows(emb)
    return vocab


def load_vocabulary(spec: Union[str, Path], *, names_file: Optional[Path] = None) -> Vocabulary:
    """A vocabulary from a built-in name, a .txt names file, a .npy [K, D] or a .pth/.pt [K, P, D].

    Built-ins: "coco" (80, COCO ids), "lvis" (1203, single names split by the §4 rule, as the
    released LVIS embeddings), "lvis-synonyms" (LVIS synonym lists), "coco-ov" (65 = 48 base +
    17 novel), "coco-base" (48), "lvis-base" (frequent + common, 866). Text files get ids 1..K.
    Imported embeddings take names from `names_file`, else COCO (K = 80) or LVIS (K = 1203).
    """
    text = str(spec)
    if text in BUILTIN:
        return _builtin(text)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".npy", ".pth", ".pt"):
        raise ValueError(f"unknown vocabulary {text!r}: {SPEC_HELP}")
    if not path.is_file():
        raise ValueError(f"vocabulary file not found: {path}")
    if names_file is not None and not Path(names_file).is_file():
        raise ValueError(f"names file not found: {names_file}")
    if suffix == ".txt":
        return _text_file_vocab(path)
    return _embedding_file_vocab(path, None if names_file is None else Path(names_file))


# ---------------------------------------------------------------- text encoders and embeddings


class TextEncoder(Protocol):
    """Anything that embeds texts. cache_key identifies model + weights (None: never cache)."""

    cache_key: Optional[str]

    def encode_text(self, texts: list[str]) -> torch.Tensor:  # [N, D], not necessarily normalised
        ...


class OpenClipTextEncoder:
    """Adapter from an open_clip model + tokenizer to `TextEncoder` (batched, no grad)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, cache_key: Optional[str], batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_key = cache_key
        self.batch_size = batch_size

    @property
    def embed_dim(self) -> Optional[int]:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        return None

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 on the CPU: open_clip's `encode_text` run on the shortest exact prefix of
        the context positions (`modeling.text_tower`), or the model's own for other models."""
        from .modeling.text_tower import encode_text_truncated  # lazy: open_clip only when used

        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i : i + self.batch_size]).to(device)
            out.append(encode_text_truncated(self.model, tokens).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim or 0)


def _cache_path(cache_dir: Path, key: str, templates: Sequence[str], synonyms: list[list[str]]) -> Path:
    payload = json.dumps({"encoder": key, "templates": list(templates), "synonyms": synonyms}, ensure_ascii=False)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return Path(cache_dir) / "text_embeddings" / f"{digest}.pt"


def _load_cached(path: Path, k: int, p: int) -> Optional[torch.Tensor]:
    if not path.is_file():
        return None
    try:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache entry is recomputed
        return None
    if isinstance(emb, torch.Tensor) and emb.dim() == 3 and tuple(emb.shape[:2]) == (k, p):
        return emb
    return None


def encode_synonyms(texts: list[str], encoder: TextEncoder, templates: Sequence[str]) -> torch.Tensor:
    """[S, D]: per text, encode every template, L2-normalise, average, re-normalise."""
    if not templates:
        raise ValueError("at least one template is needed")
    prompts = [t.format(s) for s in texts for t in templates]
    emb = torch.as_tensor(encoder.encode_text(prompts)).float().cpu()
    if emb.dim() != 2 or emb.shape[0] != len(prompts):
        raise ValueError(f"text encoder returned {tuple(emb.shape)} for {len(prompts)} texts")
    emb = F.normalize(emb, dim=-1).reshape(len(texts), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def text_embeddings(
    vocab: Vocabulary,
    encoder: Optional[TextEncoder],
    *,
    templates: Sequence[str] = TEMPLATES,
    cache_dir: Optional[Path] = None,
) -> torch.Tensor:
    """[K, P, D] float32 CPU class embeddings, unit-norm rows; P = most synonyms of any class,
    shorter classes padded by repeating their first synonym.

    Cached under `cache_dir/text_embeddings/<sha256(encoder.cache_key, templates, synonyms)>.pt`
    (no caching when cache_dir or the encoder's cache_key is None). A vocabulary with precomputed
    embeddings is returned as is, after checking D against the encoder's `embed_dim` when known.
    """
    if vocab.embeddings is not None:
        want = getattr(encoder, "embed_dim", None) if encoder is not None else None
        if want is not None and int(want) != vocab.embeddings.shape[-1]:
            raise ValueError(
                f"vocabulary {vocab.name!r} has {vocab.embeddings.shape[-1]}-d embeddings "
                f"but the model's text space is {want}-d"
            )
        return vocab.embeddings
    if encoder is None:
        raise ValueError(f"vocabulary {vocab.name!r} has no embeddings and no text encoder was given")
    k, p = len(vocab), max(len(s) for s in vocab.synonyms)
    key = getattr(encoder, "cache_key", None)
    path = None if cache_dir is None or key is None else _cache_path(cache_dir, key, templates, vocab.synonyms)
    if path is not None:
        cached = _load_cached(path, k, p)
        if cached is not None:
            return cached
    unique = list(dict.fromkeys(s for syn in vocab.synonyms for s in syn))
    index = {s: i for i, s in enumerate(unique)}
    emb = encode_synonyms(unique, encoder, templates)
    rows = [[index[s] for s in syn] + [index[syn[0]]] * (p - len(syn)) for syn in vocab.synonyms]
    out = emb[torch.tensor(rows, dtype=torch.long)]  # [K, P, D]
    if path is not None:
        torch_save_atomic(out, path)
    return out


def _class_texts(vocab: Vocabulary, i: int) -> set[str]:
    return set(split_synonyms(vocab.class_names[i])) | set(vocab.synonyms[i])


def seen_mask(vocab: Vocabulary, train_vocab: Union[Vocabulary, Sequence[str]]) -> torch.Tensor:
    """[K] bool: class i is seen when its normalised name or any synonym names a training class.

    train_vocab: a Vocabulary or plain class names (normalised with the §4 rule).
    """
    if isinstance(train_vocab, Vocabulary):
        known = set().union(*(_class_texts(train_vocab, i) for i in range(len(train_vocab))))
    else:
        known = {s for n in train_vocab for s in split_synonyms(n)}
    return torch.tensor([bool(_class_texts(vocab, i) & known) for i in range(len(vocab))], dtype=torch.bool)
