"""Registry entry + weight files → a model or a ready `Predictor`.

Model names are registry names (`ovsam_model.registry.MODEL_REGISTRY`). A baseline name may
carry a SAM variant after a colon: `baseline-image-crop:vit_b`; `:tiny` gives the baseline at
small widths with random weights (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from segment_anything import sam_model_registry

from .checkpoint import load_spec_weights, load_weight_file
from .config import TINY
from .modeling.baselines import SAMClipBaseline, build_tiny_sam
from .modeling.clip_trunk import ClipTrunk
from .modeling.ovsam import OVSAM
from .predictor import OVSAMPredictor
from .registry import ModelSpec, get_spec, with_sam_variant
from .types import Predictor
from .vocab import Vocabulary, load_vocabulary, seen_mask, text_embeddings


def resolve_spec(name_or_spec: Union[str, ModelSpec]) -> ModelSpec:
    """A registry name (with an optional `:variant` for baselines) or a spec → a spec."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    name, _, variant = name_or_spec.partition(":")
    spec = get_spec(name)
    if not variant:
        return spec
    if spec.kind == "ovsam":
        raise ValueError(f"{name} takes no ':{variant}' variant (only the baselines choose a SAM)")
    if variant == "tiny":
        return replace(spec, name=name_or_spec, config=TINY, files=(), clip_model=TINY.clip.name,
                       clip_pretrained=None, clip_quick_gelu=False, sam_variant="tiny")
    return with_sam_variant(spec, variant)


def build_model(
    name_or_spec: Union[str, ModelSpec],
    *,
    weights: Optional[Mapping[str, Union[str, Path]]] = None,
    random_weights: bool = False,
    clip_pretrained: Optional[str] = None,
    clip_cache_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
) -> OVSAM:
    """An OVSAM model: random weights everywhere, then each component file in `weights`
    (component → path) loaded strictly. `clip_pretrained` is open_clip's `pretrained=`."""
    model, _ = _build_ovsam(resolve_spec(name_or_spec), weights or {}, None if random_weights else clip_pretrained,
                            clip_cache_dir)
    return model.to(device)


def _build_ovsam(spec: ModelSpec, weights: Mapping[str, Union[str, Path]], clip_pretrained: Optional[str],
                 clip_cache_dir) -> tuple[OVSAM, dict[str, torch.Tensor]]:
    if spec.kind != "ovsam":
        raise ValueError(f"{spec.name} is a baseline, not an OVSAM model")
    model = OVSAM.from_config(spec.config, clip_pretrained=clip_pretrained,
                              clip_cache_dir=None if clip_cache_dir is None else str(clip_cache_dir),
                              quick_gelu=spec.clip_quick_gelu and clip_pretrained is not None)
    payloads = load_spec_weights(model, spec, weights)
    return model, payloads


def _build_sam(spec: ModelSpec, weights: Mapping[str, Union[str, Path]]) -> torch.nn.Module:
    if spec.sam_variant == "tiny":
        return build_tiny_sam(spec.config.image_size, spec.config.prompt_dim)
    sam = sam_model_registry[spec.sam_variant or "vit_h"](checkpoint=None)
    if "sam" in weights:
        load_weight_file(torch.nn.ModuleDict({"sam": sam}), spec.file("sam"), weights["sam"])
    return sam


def build_predictor(
    name: Union[str, ModelSpec],
    *,
    vocab: Optional[Union[str, Vocabulary]] = None,
    names_file: Optional[Path] = None,
    device: Union[str, torch.device] = "cpu",
    random_weights: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    offline: Optional[bool] = None,
    overrides: Optional[Mapping[str, Union[str, Path]]] = None,
    clip_weights: Optional[Union[str, Path]] = None,
    box_chunk: int = 64,
    amp: bool = True,
    topk: int = 5,
    mask_postprocess: str = "fast",
    roi_box: Optional[str] = None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    progress: bool = True,
) -> Predictor:
    """A ready predictor: weights fetched (or taken from `overrides` / the cache), vocabulary
    embedded with the model's own CLIP text tower (cached), the ensemble's seen classes set from
    the model's training vocabulary. `roi_box` ("mask": the predicted mask's box, the official
    choice; "prompt": the prompt box), `alpha` and `beta` override the registry's settings.
    Raises `WeightsError` / `CheckpointError` with one-line messages when weights are missing
    or malformed."""
    from .weights import clip_cache_dir, clip_pretrained_arg, resolve_cache_dir, resolve_weights, sha256_of

    spec = resolve_spec(name)
    overrides_cfg = {k: v for k, v in (("roi_box", roi_box), ("alpha", alpha), ("beta", beta)) if v is not None}
    if roi_box not in (None, "mask", "prompt"):
        raise ValueError(f"roi_box must be 'mask' or 'prompt', not {roi_box!r}")
    if overrides_cfg:
        spec = replace(spec, config=spec.config.with_(**overrides_cfg))
    paths: dict[str, Path] = {}
    clip_arg = None
    if not random_weights:
        paths = resolve_weights(spec, cache_dir=cache_dir, offline=offline, overrides=overrides, progress=progress)
        clip_arg = clip_pretrained_arg(spec, clip_weights, offline, cache_dir)
    # What the text-embedding cache keys on: the tag, or the sha256 of a --clip-weights file
    # (never a cache path, which changes between a download and later cache hits).
    clip_identity = None
    if clip_arg is not None:
        clip_identity = f"sha256:{sha256_of(Path(clip_weights))}" if clip_weights else spec.clip_pretrained
    if isinstance(vocab, Vocabulary):
        vocabulary = vocab
    else:
        vocabulary = load_vocabulary(vocab or spec.vocabulary, names_file=names_file)
    cache = resolve_cache_dir(cache_dir)

    if spec.kind == "ovsam":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-weight parts (tiny, tests) are the same in every run
            model, payloads = _build_ovsam(spec, paths, clip_arg, clip_cache_dir(cache_dir))
        model.trunk.weights_tag = clip_identity
        model.to(device)  # before the text tower encodes the vocabulary
        if "text_embeddings" in payloads and vocabulary.name == spec.vocabulary and vocabulary.embeddings is None:
            vocabulary.embeddings = payloads["text_embeddings"].float()  # the demo's LVIS embeddings
        encoder = model.trunk
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sam = _build_sam(spec, paths)
            encoder = ClipTrunk(spec.config.clip, pretrained=clip_arg, cache_dir=str(clip_cache_dir(cache_dir)),
                                quick_gelu=spec.clip_quick_gelu and clip_arg is not None).to(device)
        encoder.weights_tag = clip_identity
    class_embeds = text_embeddings(vocabulary, encoder, cache_dir=cache)
    hashes = {c: sha256_of(p) for c, p in paths.items()} if not random_weights else {}
    if spec.kind == "ovsam":
        seen = seen_mask(vocabulary, load_vocabulary(spec.train_vocabulary))
        return OVSAMPredictor(model, vocabulary, class_embeds, seen, device=device, box_chunk=box_chunk, amp=amp,
                              topk=topk, mask_postprocess=mask_postprocess, weights_sha256=hashes)
    mode = "image-crop" if spec.kind == "baseline-image-crop" else "feature-crop"
    baseline = SAMClipBaseline(sam, encoder, vocabulary, class_embeds, mode, device=device, box_chunk=box_chunk,
                               topk=topk, clip_roi_size=spec.config.clip_roi_size)
    baseline.weights_sha256 = hashes
    return baseline
