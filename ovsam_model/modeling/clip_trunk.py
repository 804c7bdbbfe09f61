"""Frozen open_clip trunk: multi-scale features C2..C5, the region head, and the text tower."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, Optional

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from ..config import ClipConfig


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """open_clip warns on the root logger when it builds random weights; for us (tests,
    `weights verify`, weights loaded afterwards) that is the intent, not news."""
    flt = _DropRandomInitWarning()
    if active:
        logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def _signal_preserving_init(visual: ModifiedResNet) -> None:
    """A ResNet's usual random init (He-normal convs, BatchNorm scale 1) for the small test
    trunks, whose weights stay random. open_clip's init zeroes the last BatchNorm of every block
    and, with frozen eval-mode statistics, its stem shrinks the signal to ~0 by C5: the features
    would not depend on the image, and no small training run could learn anything from them."""
    for m in visual.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ClipTrunk(nn.Module):
    """open_clip CLIP, frozen (`lock`), exposing C2..C5 (strides 4/8/16/32) of its image tower.

    ResNets (RN50x16): C2..C5 = layer1..layer4 after the stem; the region head is CLIP's own
    attention pool on a RoIAlign of C5 (12×12 for RN50x16: 384 / 32).
    ConvNeXt (timm trunk): C2..C5 = the four stages; the region head is the trunk's head
    (pool + norm) followed by CLIP's projection.
    """

    def __init__(self, cfg: ClipConfig, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 quick_gelu: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.custom is not None:
            self.clip = open_clip.model.CLIP(**cfg.custom)
            self.tokenizer = open_clip.get_tokenizer("RN50")
            if isinstance(self.clip.visual, ModifiedResNet):
                _signal_preserving_init(self.clip.visual)
        else:
            with _quiet_random_init(pretrained is None):
                self.clip = open_clip.create_model(cfg.name, pretrained=pretrained, cache_dir=cache_dir,
                                                   force_quick_gelu=quick_gelu)
            self.tokenizer = open_clip.get_tokenizer(cfg.name)
        self.weights_tag = pretrained
        self.is_resnet = isinstance(self.clip.visual, ModifiedResNet)
        self.lock()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def cache_key(self) -> Optional[str]:
        """Identity of the text tower for the text-embedding cache (None: random weights)."""
        return f"{self.cfg.name}/{self.weights_tag}" if self.weights_tag else None

    def lock(self) -> None:
        """Freeze every parameter and keep BatchNorm statistics fixed."""
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True) -> "ClipTrunk":
        super().train(mode)
        self.clip.eval()  # frozen trunk: BN and dropout always in eval mode
        return self

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels [B, 3, S, S] normalised → [C2, C3, C4, C5] (strides 4, 8, 16, 32)."""
        visual = self.clip.visual
        if self.is_resnet:
            x = visual.stem(pixels)
            feats = []
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = layer(x)
                feats.append(x)
            return feats
        trunk = visual.trunk
        x = trunk.stem(pixels)
        feats = []
        for stage in trunk.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def region_embed(self, c5: torch.Tensor, rois: torch.Tensor, output_size: int) -> torch.Tensor:
        """Frozen-CLIP region embedding.

        c5: [B, C, S/32, S/32]; rois: [R, 5] (image index, XYXY in the model frame).
        Returns [R, D], not normalised.
        """
        feats = roi_align(c5.float(), rois.float(), output_size, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
        feats = feats.to(c5.dtype)  # the head runs in the trunk's dtype (autocast decides)
        visual = self.clip.visual
        if self.is_resnet:
            return visual.attnpool(feats)
        return visual.head(visual.trunk.forward_head(feats, pre_logits=True))

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """[N] strings → [N, D] text embeddings (not normalised), in batches (LVIS × 14 templates
        is ~17k prompts: one batch would need tens of GB)."""
        device = next(self.clip.parameters()).device
        starts = range(0, len(texts), batch_size)
        out = [self.clip.encode_text(self.tokenizer(texts[s : s + batch_size]).to(device)).float()
               for s in tqdm(starts, desc="text embeddings", unit="batch", file=sys.stderr, leave=False,
                             disable=len(starts) < 8)]  # a bar only for long vocabularies (LVIS: ~66 batches)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
