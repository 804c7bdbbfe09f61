"""Model tags: which weight files a model needs, where they live, their checksums, and the
preprocessing / RoI size / ensemble settings that go with them.

A `ModelSpec` is pure data: `weights` fetches its files, `checkpoint` loads them, `builder`
turns a spec plus files into a model. Sizes and sha256 sums of the OVSAM files are the Git-LFS
records of the Hugging Face repositories (see shared/data/ovsam-keys/README.md §5); where none
is known, `weights` records the sha256 of the first download in a `<file>.sha256` sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from ovsam_model.config import PIXEL_MEAN, PIXEL_STD, RN50X16, TINY, TINY_256, OVSAMConfig

HF_MODELS = "https://huggingface.co/HarborYuan/ovsam_models/resolve/main/"
HF_SPACE = "https://huggingface.co/spaces/HarborYuan/ovsam/resolve/main/models/"
SAM_HOST = "https://dl.fbaipublicfiles.com/segment_anything/"

ModelKind = Literal["ovsam", "baseline-image-crop", "baseline-feature-crop"]


@dataclass(frozen=True)
class WeightFile:
    """One released weight file and where its tensors go.

    `targets` are (key prefix in the file, attribute path in the model) pairs; a key belongs to
    the first target whose prefix it starts with, and the prefix is stripped before loading.
    Prefix "" takes every remaining key, or, for a file holding a bare tensor, the tensor
    itself (`tensor_shape` then gives the expected shape, None for a free dimension).
    `extract_to`: the file is large and only the targets are needed, so they are extracted
    once into this small cached file (SAM's prompt encoder). `ignore_other_keys`: keys outside
    the targets are expected in the file and ignored (a whole SAM checkpoint given for its
    prompt encoder) instead of being reported as unexpected.
    """

    component: str
    filename: str
    url: str
    sha256: Optional[str] = None
    size: Optional[int] = None
    targets: tuple[tuple[str, str], ...] = ()
    description: str = ""
    extract_to: Optional[str] = None
    ignore_other_keys: bool = False
    tensor_shape: Optional[tuple[Optional[int], ...]] = None

    @property
    def cache_name(self) -> str:
        """File name of this component in the weights cache."""
        return self.extract_to or self.filename

    @property
    def is_tensor(self) -> bool:
        """The file holds a bare tensor (text embeddings), not a state dict."""
        return self.tensor_shape is not None


@dataclass(frozen=True)
class Preprocessing:
    """Pixel statistics (RGB, 0-255) and the square input size the weights were trained with."""

    mean: tuple[float, float, float] = PIXEL_MEAN
    std: tuple[float, float, float] = PIXEL_STD
    image_size: int = 1024


@dataclass(frozen=True)
class ModelSpec:
    """A model tag. `files` are in load order (later targets overwrite earlier ones).

    `vocabulary` is the default class vocabulary; `train_vocabulary` names the classes seen in
    training ("coco-base": the 48 COCO base classes; "lvis-base": LVIS frequent + common),
    which decides α vs β in the frozen-CLIP ensemble. The frozen CLIP is
    `open_clip.create_model(clip_model, pretrained=clip_pretrained, force_quick_gelu=...)`:
    OpenAI's ResNets were trained with QuickGELU and open_clip's plain `RN50x16` config does
    not use it, so `clip_quick_gelu` must be passed along whenever weights come from a file.
    """

    name: str
    kind: ModelKind
    config: OVSAMConfig
    files: tuple[WeightFile, ...]
    vocabulary: str
    train_vocabulary: str
    clip_model: str
    clip_pretrained: Optional[str]
    clip_quick_gelu: bool = True
    sam_variant: Optional[str] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    description: str = ""
    # files the model loads only when the user gives them (`--checkpoint COMPONENT=PATH`), never
    # fetched: the random-weight `tiny` models take a trained adapter or CLIP2SAM file this way
    user_files: tuple[WeightFile, ...] = ()

    @property
    def downloads_nothing(self) -> bool:
        """A model of random weights (`tiny`): no file of its own and no pretrained CLIP."""
        return not self.files and not self.clip_pretrained

    @property
    def components(self) -> tuple[str, ...]:
        """The components of the files the model downloads."""
        return tuple(f.component for f in self.files)

    @property
    def all_components(self) -> tuple[str, ...]:
        """Every component `--checkpoint` may name: the downloaded files' and `user_files`'."""
        return tuple(f.component for f in (*self.files, *self.user_files))

    def file(self, component: str) -> WeightFile:
        for f in self.files:
            if f.component == component:
                return f
        raise KeyError(f"{self.name} has no weight component {component!r} "
                       f"(components: {', '.join(self.components) or 'none'})")


class UnknownModelError(KeyError):
    """A model name that is not in `MODEL_REGISTRY`."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


# --- SAM checkpoints (Meta, Apache-2.0) -------------------------------------------------------

SAM_CHECKPOINTS: dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}


def sam_weight(variant: str = "vit_h") -> WeightFile:
    """A whole SAM checkpoint (the baselines run SAM's own image encoder)."""
    filename = SAM_CHECKPOINTS[variant]
    return WeightFile(component="sam", filename=filename, url=SAM_HOST + filename, targets=(("", "sam"),),
                      description=f"Segment Anything {variant}")


def prompt_encoder_weight(variant: str = "vit_h") -> WeightFile:
    """SAM's prompt encoder, extracted once from the full SAM checkpoint into a small file."""
    return replace(
        sam_weight(variant),
        component="prompt_encoder",
        targets=(("prompt_encoder.", "prompt_encoder"),),
        description=f"SAM {variant} prompt encoder (6,476 params), extracted from {SAM_CHECKPOINTS[variant]}",
        extract_to=f"sam_{variant}_prompt_encoder.pth",
        ignore_other_keys=True,
    )


def sam_decoder_weight(variant: str = "vit_h") -> WeightFile:
    """SAM's mask decoder (4 M params), extracted once from the full SAM checkpoint: where
    `ovsam finetune` starts the one-token decoder from (token 0, spec §2)."""
    return replace(
        sam_weight(variant),
        component="sam_decoder",
        targets=(("mask_decoder.", "head.mask_decoder"),),
        description=f"SAM {variant} mask decoder, extracted from {SAM_CHECKPOINTS[variant]} (finetune init)",
        extract_to=f"sam_{variant}_mask_decoder.pth",
        ignore_other_keys=True,
    )


# --- OVSAM files ------------------------------------------------------------------------------

SAM2CLIP = WeightFile(
    component="sam2clip",
    filename="sam2clip_vith_rn50x16.pth",
    url=HF_MODELS + "sam2clip_vith_rn50x16.pth",
    sha256="f2b14b8e480626cffc815a7262297731ee1372c87d054836daad5148f636cfeb",
    size=536_408_050,
    targets=(("neck_student.", "adapter"),),
    description="SAM2CLIP adapter distilled from SAM ViT-H onto CLIP RN50x16 features",
)


def _clip2sam(dataset: str, sha256: Optional[str], size: Optional[int]) -> WeightFile:
    filename = f"clip2sam_{dataset}_rn50x16.pth"
    return WeightFile(
        component="clip2sam",
        filename=filename,
        url=HF_MODELS + filename,
        sha256=sha256,
        size=size,
        targets=(("fpn_neck.", "fpn"), ("mask_decoder.", "head")),
        description=f"CLIP2SAM FPN + mask decoder + RoI head trained on {dataset.upper()}",
    )


CLIP2SAM_COCO = _clip2sam("coco", "c382555880466adafa2eff148851b3cc71e1ea5eb5ff8f36d0fab2047550e27e",
                          31_544_126)
CLIP2SAM_LVIS = _clip2sam("lvis", None, None)  # only "31.5 MB" is published

DEMO_HEAD = WeightFile(
    component="head",
    filename="ovsam_R50x16_lvisnorare.pth",
    url=HF_SPACE + "ovsam_R50x16_lvisnorare.pth",
    sha256="7120eb3987b09bd7f90e0447d049af171bb1404aada1df1375b186f14447dbd6",
    size=16_195_476,
    targets=(("mask_decoder.", "head"),),
    description="demo mask decoder + RoI head trained on LVIS without rare classes",
)

DEMO_FPN = WeightFile(
    component="fpn",
    filename="R50x16_fpn_lvis_norare_v3det.pth",
    url=HF_SPACE + "R50x16_fpn_lvis_norare_v3det.pth",
    sha256="052f6aa7f41c7aa1e3bbf3b9f6527dd25004e1341bd3f7e1586198c9ea699f20",
    size=16_157_980,
    targets=(("fpn_neck.", "fpn"), ("roi_conv.", "head.roi_conv")),
    description="demo FPN + roi_conv trained on V3Det + LVIS (overrides the head's roi_conv)",
)

DEMO_TEXT = WeightFile(
    component="text_embeddings",
    filename="RN50x16_LVISV1Dataset.pth",
    url=HF_SPACE + "RN50x16_LVISV1Dataset.pth",
    sha256="2c01a464e8c7ebb47c6c8c07199a0d3774ebb8959880da50a6de1dc992dadb59",
    size=7_392_482,
    targets=(("", "text_embeddings"),),
    description="LVIS v1 class embeddings [1203, 2, 768] (single names, unit-norm)",
    tensor_shape=(1203, None, 768),
)

# RoI size per checkpoint (spec §2): 12 for the COCO test config, 7 for LVIS and the demo.
_COCO_CONFIG = RN50X16.with_(roi_size=12, alpha=0.1, beta=0.9)
_LVIS_CONFIG = RN50X16.with_(roi_size=7, alpha=0.1, beta=0.9)


def _ovsam(name: str, config: OVSAMConfig, files: tuple[WeightFile, ...], vocabulary: str,
           train_vocabulary: str, description: str) -> ModelSpec:
    return ModelSpec(name=name, kind="ovsam", config=config, files=files, vocabulary=vocabulary,
                     train_vocabulary=train_vocabulary, clip_model=config.clip.name,
                     clip_pretrained=config.clip.pretrained, clip_quick_gelu=True,
                     description=description)


def _tiny(name: str, config: OVSAMConfig, description: str) -> ModelSpec:
    """Random weights (seed 0) unless the user gives a trained file in the released layouts
    (`ovsam distill` / `ovsam finetune` outputs) with `--checkpoint`."""
    return ModelSpec(name=name, kind="ovsam", config=config, files=(), vocabulary="coco",
                     train_vocabulary="coco-base", clip_model=config.clip.name, clip_pretrained=None,
                     clip_quick_gelu=False, description=description,
                     user_files=(SAM2CLIP, CLIP2SAM_COCO, prompt_encoder_weight()))


def _baseline(kind: ModelKind, sam_variant: str = "vit_h") -> ModelSpec:
    config = RN50X16.with_(roi_size=12)
    return ModelSpec(name=kind, kind=kind, config=config, files=(sam_weight(sam_variant),),
                     vocabulary="coco", train_vocabulary="coco-base",
                     clip_model=config.clip.name, clip_pretrained=config.clip.pretrained,
                     clip_quick_gelu=True, sam_variant=sam_variant,
                     description=f"SAM {sam_variant} + frozen CLIP RN50x16, {kind[9:]} classification")


def with_sam_variant(spec: ModelSpec, variant: str) -> ModelSpec:
    """A baseline spec running another SAM ("vit_h", "vit_l", "vit_b")."""
    if spec.kind == "ovsam":
        raise ValueError(f"{spec.name} is not a baseline: its SAM parts are fixed to ViT-H")
    if variant not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown SAM variant {variant!r} (known: {', '.join(SAM_CHECKPOINTS)})")
    files = tuple(sam_weight(variant) if f.component == "sam" else f for f in spec.files)
    return replace(spec, files=files, sam_variant=variant,
                   description=spec.description.replace(spec.sam_variant or "", variant, 1))


MODEL_REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _ovsam("ovsam-rn50x16-coco", _COCO_CONFIG, (SAM2CLIP, CLIP2SAM_COCO, prompt_encoder_weight()),
               "coco", "coco-base", "OVSAM RN50x16, CLIP2SAM trained on the 48 COCO base classes"),
        _ovsam("ovsam-rn50x16-lvis", _LVIS_CONFIG, (SAM2CLIP, CLIP2SAM_LVIS, prompt_encoder_weight()),
               "lvis", "lvis-base", "OVSAM RN50x16, CLIP2SAM trained on LVIS frequent + common"),
        _ovsam("ovsam-rn50x16-demo", _LVIS_CONFIG,
               (SAM2CLIP, DEMO_HEAD, DEMO_FPN, DEMO_TEXT, prompt_encoder_weight()),
               "lvis", "lvis-base",
               "the Hugging Face Space model: LVIS-norare decoder, V3Det+LVIS FPN and roi_conv"),
        _baseline("baseline-image-crop"),
        _baseline("baseline-feature-crop"),
        _tiny("tiny", TINY, "the real architecture at small widths, random weights (tests)"),
        _tiny("tiny-256", TINY_256, "tiny at 256² inputs: small training runs that learn on a CPU in minutes"),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry `name`; `UnknownModelError` (a KeyError) lists the known names."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_REGISTRY)}") from None


def resolve_spec(name_or_spec: "str | ModelSpec") -> ModelSpec:
    """A registry name (with an optional `:variant` for baselines) or a spec → a spec.

    `:tiny` gives a baseline at small widths with random weights (tests, benchmarks); other
    variants choose the baseline's SAM (`:vit_b`, `:vit_l`). Needs no torch, so the CLI can
    check a model name before anything heavy is imported."""
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
