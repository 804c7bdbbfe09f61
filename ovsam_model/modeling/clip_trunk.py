"""Frozen open_clip trunk: multi-scale features C2..C5, the region head, and the text tower."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Optional

import open_clip
import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from ..config import ClipConfig
from . import attnpool_rois
from .folded_resnet import FoldedResNet, weights_key
from .text_tower import encode_text_truncated


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


# --- fast paths (`ClipTrunk.fast_path`): exact rewrites of the frozen ResNet's forward and region head ---------

class _FastState:
    """Tensors derived from the trunk's weights for the fast paths. Held outside
    `nn.Module` registration: never in `state_dict`, `parameters()` or `buffers()`; a copy or a
    pickle of the trunk starts empty. Cleared by `.to()`/`.cuda()`/`.half()`… (`ClipTrunk._apply`)
    and by `load_state_dict`; every use also checks the sources' key (`_weights_key`), so in-place
    writes to the parameters are seen too. Writes through `param.data` bypass version counting, and
    a replaced submodule is not looked for: call `ClipTrunk.clear_fast_cache()` after those."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.trunk: Optional[tuple[tuple, "FoldedResNet", list[torch.Tensor]]] = None  # (key, folded, sources)
        self.pool: Optional[tuple[tuple, dict[str, torch.Tensor]]] = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def __deepcopy__(self, memo: dict) -> "_FastState":
        return _FastState()


def _clear_fast_state(module: "ClipTrunk", *args) -> None:
    module.clear_fast_cache()


def _create_clip(name: str, pretrained: Optional[str], cache_dir: Optional[str], quick_gelu: bool) -> nn.Module:
    """open_clip's model; a `pretrained` file that open_clip cannot load (corrupt, truncated, not
    a CLIP state dict) is a one-line `CheckpointError` naming it, not open_clip's traceback."""
    try:
        with _quiet_random_init(pretrained is None):
            return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir,
                                          force_quick_gelu=quick_gelu)
    except Exception as e:  # unpickling, zip, safetensors and key errors have many types
        if pretrained is None or not os.path.isfile(pretrained):
            raise
        from ovsam_model.checkpoint import CheckpointError, load_failure_reason

        raise CheckpointError(f"CLIP weights {pretrained}: cannot load them into open_clip's {name} "
                              f"({load_failure_reason(e)})") from e


class ClipTrunk(nn.Module):
    """open_clip CLIP, frozen (`lock`), exposing C2..C5 (strides 4/8/16/32) of its image tower.

    ResNets (RN50x16): C2..C5 = layer1..layer4 after the stem; the region head is CLIP's own
    attention pool on a RoIAlign of C5 (12×12 for RN50x16: 384 / 32).
    ConvNeXt (timm trunk): C2..C5 = the four stages; the region head is the trunk's head
    (pool + norm) followed by CLIP's projection.

    `fast_path` (default True; ResNets only) runs exact rewrites of the same computation: the
    trunk with every BatchNorm folded into its conv, in channels_last (the folded weights are
    derived tensors outside `state_dict`, rebuilt when the weights change), and the attention pool
    without projecting each RoI token (`_region_embed_fast`). False: open_clip's modules as they are.
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
            self.clip = _create_clip(cfg.name, pretrained, cache_dir, quick_gelu)
            self.tokenizer = open_clip.get_tokenizer(cfg.name)
        self.weights_tag = pretrained
        self.is_resnet = isinstance(self.clip.visual, ModifiedResNet)
        # True: the exact fast rewrites of the ResNet trunk (BatchNorm folded, channels_last) and of
        # the region head (projected attention pool); False: open_clip's modules as they are.
        self.fast_path = True
        self._fast = _FastState()
        self.register_load_state_dict_pre_hook(_clear_fast_state)
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

    def clear_fast_cache(self) -> None:
        """Drop the fast paths' derived tensors (rebuilt on next use). Needed only after writing
        the weights through `param.data` (not version-counted) or replacing a submodule of the
        image tower; `.to()`, `load_state_dict` and in-place writes are detected."""
        self._fast.clear()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), …: the derived copies are stale
        self.clear_fast_cache()
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _cached(slot: Optional[tuple], key: Optional[tuple], device: torch.device, build):
        """(value, new slot): the slot's value when its key is `key`, else a fresh `build()` (stored
        unless the key is None). Built outside inference mode, autograd and autocast, so the cached
        tensors are plain frozen tensors in the weights' dtype whatever mode the first call ran in."""
        if key is not None and slot is not None and slot[0] == key:
            return slot[1], slot
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            value = build()
        return value, (None if key is None else (key, value))

    def _folded_trunk(self) -> Optional[FoldedResNet]:
        """The folded trunk, rebuilt when any source tensor changed. The list of sources is kept
        with it (walking the ~130 conv/BN pairs of RN50x16 costs ~2 ms a call; their tensors' key
        0.2 ms); replacing a submodule of the trunk therefore needs `clear_fast_cache()`."""
        slot = self._fast.trunk
        if slot is not None:
            key, folded, sources = slot
            if key is not None and weights_key(sources) == key:
                return folded
        visual = self.clip.visual
        sources = FoldedResNet.sources(visual)
        if sources is None:
            self._fast.trunk = None
            return None
        key = weights_key(sources)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(sources[0].device.type, enabled=False):
            folded = FoldedResNet(visual)
        self._fast.trunk = None if key is None else (key, folded, sources)
        return folded

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels [B, 3, S, S] normalised → [C2, C3, C4, C5] (strides 4, 8, 16, 32)."""
        visual = self.clip.visual
        if self.is_resnet and self.fast_path and not visual.training:  # folding needs eval-mode BatchNorm
            folded = self._folded_trunk()
            if folded is not None:
                return folded(pixels)
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
        if self.is_resnet and self.fast_path:
            out = self._region_embed_fast(c5, rois, output_size)
            if out is not None:
                return out
        feats = roi_align(c5.float(), rois.float(), output_size, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
        feats = feats.to(c5.dtype)  # the head runs in the trunk's dtype (autocast decides)
        visual = self.clip.visual
        if self.is_resnet:
            return visual.attnpool(feats)
        return visual.head(visual.trunk.forward_head(feats, pre_logits=True))

    def _region_embed_fast(self, c5: torch.Tensor, rois: torch.Tensor, output_size: int) -> Optional[torch.Tensor]:
        """open_clip's AttentionPool2d on RoIAligned C5 without projecting the RoI's tokens
        (`attnpool_rois`). Nothing per image is needed, so chunked calls on one image repeat nothing. None: not applicable."""
        pool = self.clip.visual.attnpool
        n_tok = output_size * output_size
        r = rois.shape[0]
        if (type(pool) is not AttentionPool2d or pool.positional_embedding.shape[0] != n_tok + 1 or r == 0
                or c5.shape[1] % pool.num_heads):
            return None
        sources = attnpool_rois.pool_sources(pool)
        consts, self._fast.pool = self._cached(self._fast.pool, weights_key(sources), sources[0].device,
                                               lambda: attnpool_rois.pool_constants(pool))
        x = roi_align(c5.float(), rois.float(), output_size, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
        return attnpool_rois.attnpool_on_roi_tokens(pool, x.to(c5.dtype).view(r, c5.shape[1], n_tok), consts)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """[N] strings → [N, D] text embeddings (not normalised), in batches (LVIS × 14 templates
        is ~17k prompts: one batch would need tens of GB)."""
        device = next(self.clip.parameters()).device
        starts = range(0, len(texts), batch_size)
        out = [encode_text_truncated(self.clip, self.tokenizer(texts[s : s + batch_size]).to(device)).float()
               for s in tqdm(starts, desc="text embeddings", unit="batch", file=sys.stderr, leave=False,
                             disable=len(starts) < 8)]  # a bar only for long vocabularies (LVIS: ~66 batches)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
