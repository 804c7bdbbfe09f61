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
from .modeling.compiled import compile_image_side
from .modeling.fast_attention import use_sdpa
from .modeling.ovsam import OVSAM
from .predictor import OVSAMPredictor
from .registry import SAM_CHECKPOINTS, ModelSpec, resolve_spec, sam_weight
from .types import Predictor
from .vocab import Vocabulary, load_vocabulary, seen_mask, text_embeddings
from .weights import ResolvedWeights, resolve_cache_dir, resolve_model_weights

__all__ = ["SAM_VARIANTS", "build_model", "build_predictor", "build_sam", "resolve_spec"]

# `resolve_spec` (a name with an optional `:variant`, or a spec → a spec) lives in the registry,
# which needs no torch; it is re-exported here for the callers of the builder.
SAM_VARIANTS = (*SAM_CHECKPOINTS, "tiny")


def build_sam(variant: str = "vit_h", weights_path: Optional[Union[str, Path]] = None) -> torch.nn.Module:
    """segment_anything's `Sam` of `variant` ("vit_h", "vit_l", "vit_b"; "tiny": the real
    architecture at small widths, `config.TINY`), random weights, then the whole SAM checkpoint
    `weights_path` (official layout) loaded strictly when given. The one place a SAM is built:
    the baselines, the distillation teacher and `ovsam weights verify` use it. Its image
    encoder's attention runs through `scaled_dot_product_attention` (`fast_attention.use_sdpa`)."""
    if variant == "tiny":
        if weights_path is not None:
            raise ValueError("the tiny SAM has random weights only (no weights_path)")
        sam = build_tiny_sam(TINY.image_size, TINY.prompt_dim)
    elif variant not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown SAM variant {variant!r} (known: {', '.join(SAM_VARIANTS)})")
    else:
        sam = sam_model_registry[variant](checkpoint=None)
        if weights_path is not None:
            load_weight_file(torch.nn.ModuleDict({"sam": sam}), sam_weight(variant), weights_path)
    use_sdpa(sam.image_encoder)
    return sam


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
    cpu_bf16: bool = False,
    topk: int = 5,
    mask_postprocess: str = "fast",
    roi_box: Optional[str] = None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    progress: bool = True,
    compile: bool = False,
) -> Predictor:
    """A ready predictor: weights fetched (or taken from `overrides` / the cache), vocabulary
    embedded with the model's own CLIP text tower (cached), the ensemble's seen classes set from
    the model's training vocabulary. `roi_box` ("mask": the predicted mask's box, the official
    choice; "prompt": the prompt box), `alpha` and `beta` override the registry's settings.
    `amp`: bf16 autocast on CUDA; `cpu_bf16`: bf16 autocast on CPU too (OVSAM models).
    `compile`: `torch.compile` the CLIP trunk and the SAM2CLIP adapter (OVSAM models on CUDA:
    `modeling.compiled`). Raises `WeightsError` / `CheckpointError` with one-line messages when
    weights are missing or malformed, ValueError for options that do not apply."""
    spec = resolve_spec(name)
    if compile and spec.kind != "ovsam":
        raise ValueError(f"--compile applies to OVSAM models; {spec.name} is a baseline")
    if cpu_bf16 and spec.kind != "ovsam":
        raise ValueError(f"--cpu-bf16 applies to OVSAM models; {spec.name} is a baseline")
    if compile and torch.device(device).type != "cuda":
        raise ValueError(f"--compile needs a CUDA device (the device is {device})")
    overrides_cfg = {k: v for k, v in (("roi_box", roi_box), ("alpha", alpha), ("beta", beta)) if v is not None}
    if roi_box not in (None, "mask", "prompt"):
        raise ValueError(f"roi_box must be 'mask' or 'prompt', not {roi_box!r}")
    if overrides_cfg:
        spec = replace(spec, config=spec.config.with_(**overrides_cfg))
    resolved = ResolvedWeights()
    if not random_weights:
        resolved = resolve_model_weights(spec, cache_dir=cache_dir, offline=offline, overrides=overrides,
                                         clip_weights=clip_weights, progress=progress)
    paths, clip_arg, clip_identity = resolved.paths, resolved.clip_pretrained, resolved.clip_identity
    if isinstance(vocab, Vocabulary):
        vocabulary = vocab
    else:
        vocabulary = load_vocabulary(vocab or spec.vocabulary, names_file=names_file)
    cache = resolve_cache_dir(cache_dir)

    if spec.kind == "ovsam":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-weight parts (tiny, tests) are the same in every run
            model, payloads = _build_ovsam(spec, paths, clip_arg, resolved.clip_cache_dir)
        model.trunk.weights_tag = clip_identity
        model.to(device)  # before the text tower encodes the vocabulary
        if "text_embeddings" in payloads and vocabulary.name == spec.vocabulary and vocabulary.embeddings is None:
            vocabulary.embeddings = payloads["text_embeddings"].float()  # the demo's LVIS embeddings
        encoder = model.trunk
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sam = build_sam(spec.sam_variant or "vit_h", paths.get("sam"))
            encoder = ClipTrunk(spec.config.clip, pretrained=clip_arg,
                                cache_dir=None if resolved.clip_cache_dir is None else str(resolved.clip_cache_dir),
                                quick_gelu=spec.clip_quick_gelu and clip_arg is not None).to(device)
        encoder.weights_tag = clip_identity
    class_embeds = text_embeddings(vocabulary, encoder, cache_dir=cache)
    hashes = resolved.sha256
    if spec.kind == "ovsam":
        seen = seen_mask(vocabulary, load_vocabulary(spec.train_vocabulary))
        predictor = OVSAMPredictor(model, vocabulary, class_embeds, seen, device=device, box_chunk=box_chunk, amp=amp,
                                   cpu_bf16=cpu_bf16,
                                   topk=topk, mask_postprocess=mask_postprocess, weights_sha256=hashes)
        if compile:
            compile_image_side(predictor.model)
        return predictor
    mode = "image-crop" if spec.kind == "baseline-image-crop" else "feature-crop"
    baseline = SAMClipBaseline(sam, encoder, vocabulary, class_embeds, mode, device=device, box_chunk=box_chunk,
                               topk=topk, clip_roi_size=spec.config.clip_roi_size)
    baseline.weights_sha256 = hashes
    return baseline
