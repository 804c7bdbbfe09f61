"""Architecture sizes of an OVSAM model (no weights, no hosts: see `registry`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

# SAM's pixel statistics (RGB, 0-255), used for the CLIP trunk too (spec §3).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ClipConfig:
    """Which open_clip model is the frozen trunk.

    `name` is an open_clip model name ("RN50x16", "convnext_large_d_320"). For tests, a
    custom small ModifiedResNet is described by `custom` (an open_clip model-config dict:
    {"embed_dim", "vision_cfg", "text_cfg"}) and `name` is only a label.
    """

    name: str = "RN50x16"
    pretrained: Optional[str] = "openai"
    custom: Optional[dict] = None
    # channels of C2..C5 and the size of the attention-pool grid (RN50x16: 384 / 32 = 12)
    channels: tuple[int, int, int, int] = (384, 768, 1536, 3072)
    embed_dim: int = 768

    def __hash__(self) -> int:  # dict field: hash by name
        return hash((self.name, self.pretrained, self.channels, self.embed_dim))


@dataclass(frozen=True)
class OVSAMConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    image_size: int = 1024
    # SAM2CLIP adapter (spec §2)
    adapter_dim: int = 1280
    adapter_depth: int = 5
    adapter_heads: int = 16
    adapter_window: int = 14
    adapter_global_blocks: tuple[int, ...] = (4,)
    # SAM prompt encoder / mask decoder
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    # CLIP2SAM
    fpn_dim: int = 256
    roi_size: int = 12
    clip_roi_size: int = 12
    finest_scale: float = 56.0
    # classification
    logit_scale: float = 100.0
    alpha: float = 0.1
    beta: float = 0.9
    label_token_enabled: bool = False  # released checkpoints: label branch ×0 (spec §2)
    roi_box: str = "mask"  # "mask" (official, published numbers) or "prompt"

    @property
    def embedding_size(self) -> int:
        return self.image_size // 16

    def with_(self, **kw) -> "OVSAMConfig":
        return replace(self, **kw)


RN50X16 = OVSAMConfig()

CONVNEXT_L = OVSAMConfig(
    clip=ClipConfig(name="convnext_large_d_320", pretrained="laion2b_s29b_b131k_ft_soup",
                    channels=(192, 384, 768, 1536), embed_dim=768),
)

# The real architecture at small widths, for tests and benchmarks with random weights.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 384, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY = OVSAMConfig(
    clip=ClipConfig(name="tiny-rn", pretrained=None, custom=TINY_CLIP, channels=(32, 64, 128, 256), embed_dim=64),
    adapter_dim=64,
    adapter_depth=2,
    adapter_heads=2,
    adapter_global_blocks=(1,),
    prompt_dim=32,
    decoder_mlp_dim=64,
    decoder_heads=2,
    fpn_dim=32,
)

# `tiny` at 256² inputs (16² embedding grid, 64² mask logits; the RoI level rule scaled with the
# input: finest_scale 56 × 256/1024): training runs that run to the end on a CPU in minutes.
TINY_256 = TINY.with_(image_size=256, finest_scale=14.0)
