"""Frozen open_clip trunk: multi-scale features C2..C5, the region head, and the text tower."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from ..config import ClipConfig
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

def _weights_key(tensors: list[torch.Tensor]) -> Optional[tuple]:
    """What identifies the source tensors' values: device and dtype, then each tensor's storage and
    in-place write count (a new storage, a `load_state_dict` copy or any in-place op changes it).
    None when one is an inference tensor: it has no version counter, nothing derived may be kept."""
    try:
        return (tensors[0].device, tensors[0].dtype, tuple([(t.data_ptr(), t._version) for t in tensors]))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


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
        self.trunk: Optional[tuple[tuple, "_FoldedResNet", list[torch.Tensor]]] = None  # (key, folded, sources)
        self.pool: Optional[tuple[tuple, dict[str, torch.Tensor]]] = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def __deepcopy__(self, memo: dict) -> "_FastState":
        return _FastState()


def _clear_fast_state(module: "ClipTrunk", *args) -> None:
    module.clear_fast_cache()


def _conv_bn_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[torch.Tensor]:
    out = [conv.weight, bn.running_mean, bn.running_var]
    out += [t for t in (conv.bias, bn.weight, bn.bias) if t is not None]
    return out


class _FoldedConv:
    """conv + eval-mode BatchNorm as one conv with bias, weight in channels_last."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        w = conv.weight
        dt = torch.promote_types(w.dtype, torch.float32)  # fold in ≥ fp32, store in the weights' dtype
        scale = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dt)
        shift = -bn.running_mean.to(dt)
        if conv.bias is not None:
            shift = shift + conv.bias.to(dt)
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias.to(dt)
        self.weight = (w.to(dt) * scale.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=torch.channels_last)
        self.bias = bias.to(w.dtype)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _FoldedBottleneck:
    def __init__(self, block: Bottleneck) -> None:
        self.conv1 = _FoldedConv(block.conv1, block.bn1)
        self.conv2 = _FoldedConv(block.conv2, block.bn2)
        self.conv3 = _FoldedConv(block.conv3, block.bn3)
        self.avgpool = block.avgpool  # parameter-free: AvgPool2d(stride) or Identity
        self.down_pool = self.down = None
        if block.downsample is not None:
            self.down_pool = block.downsample[0]
            self.down = _FoldedConv(block.downsample[1], block.downsample[2])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # open_clip's Bottleneck.forward with each BatchNorm folded into its conv
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(self.conv2(out), inplace=True)
        out = self.conv3(self.avgpool(out))
        identity = x if self.down is None else self.down(self.down_pool(x))
        out += identity
        return F.relu(out, inplace=True)


class _FoldedResNet:
    """ModifiedResNet's stem and layer1..4 with folded BatchNorms, run in channels_last."""

    def __init__(self, visual: ModifiedResNet) -> None:
        self.stem = [_FoldedConv(visual.conv1, visual.bn1), _FoldedConv(visual.conv2, visual.bn2),
                     _FoldedConv(visual.conv3, visual.bn3)]
        self.stem_pool = visual.avgpool
        self.layers = [[_FoldedBottleneck(b) for b in layer]
                       for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)]

    @staticmethod
    def sources(visual: ModifiedResNet) -> Optional[list[torch.Tensor]]:
        """The tensors the folded copy is computed from; None when the structure is not the one
        this fold reproduces exactly (then the plain forward runs)."""
        pairs = [(visual.conv1, visual.bn1), (visual.conv2, visual.bn2), (visual.conv3, visual.bn3)]
        acts = [visual.act1, visual.act2, visual.act3]
        pools = [visual.avgpool]
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for b in layer:
                if type(b) is not Bottleneck:
                    return None
                acts += [b.act1, b.act2, b.act3]
                pools.append(b.avgpool)
                pairs += [(b.conv1, b.bn1), (b.conv2, b.bn2), (b.conv3, b.bn3)]
                if b.downsample is not None:
                    if len(b.downsample) != 3:
                        return None
                    pools.append(b.downsample[0])
                    pairs.append((b.downsample[1], b.downsample[2]))
        if (any(type(a) is not nn.ReLU for a in acts)
                or any(type(m) not in (nn.AvgPool2d, nn.Identity) for m in pools)):
            return None
        out: list[torch.Tensor] = []
        for conv, bn in pairs:
            if (type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or conv.padding_mode != "zeros"
                    or bn.running_mean is None or bn.training):
                return None
            out += _conv_bn_sources(conv, bn)
        return out

    def __call__(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = pixels.contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = F.relu(conv(x), inplace=True)
        x = self.stem_pool(x)
        feats = []
        for layer in self.layers:
            for block in layer:
                x = block(x)
            feats.append(x.contiguous())  # downstream gets the usual NCHW-contiguous layout
        return feats


def _pool_sources(pool: AttentionPool2d) -> list[torch.Tensor]:
    return [pool.q_proj.weight, pool.q_proj.bias, pool.k_proj.weight, pool.k_proj.bias, pool.v_proj.weight,
            pool.v_proj.bias, pool.positional_embedding]


def _pool_constants(pool: AttentionPool2d) -> dict[str, torch.Tensor]:
    """The RoI-independent parts of the spatial tokens' keys and values: (W_k pos_l + b_k) and
    (W_v pos_l + b_v) for l = 1..L, split by head."""
    heads = pool.num_heads
    pos = pool.positional_embedding[1:]  # [L, C]; row 0 is the mean token's
    n_tok, c = pos.shape
    k_pos = F.linear(pos, pool.k_proj.weight, pool.k_proj.bias).view(n_tok, heads, c // heads)
    v_pos = F.linear(pos, pool.v_proj.weight, pool.v_proj.bias).view(n_tok, heads, c // heads)
    return {"k_pos": k_pos.permute(1, 2, 0).contiguous(),  # [H, d, L]
            "v_pos": v_pos.transpose(0, 1).contiguous()}  # [H, L, d]


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
            with _quiet_random_init(pretrained is None):
                self.clip = open_clip.create_model(cfg.name, pretrained=pretrained, cache_dir=cache_dir,
                                                   force_quick_gelu=quick_gelu)
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

    def _folded_trunk(self) -> Optional[_FoldedResNet]:
        """The folded trunk, rebuilt when any source tensor changed. The list of sources is kept
        with it (walking the ~130 conv/BN pairs of RN50x16 costs ~2 ms a call; their tensors' key
        0.2 ms); replacing a submodule of the trunk therefore needs `clear_fast_cache()`."""
        slot = self._fast.trunk
        if slot is not None:
            key, folded, sources = slot
            if key is not None and _weights_key(sources) == key:
                return folded
        visual = self.clip.visual
        sources = _FoldedResNet.sources(visual)
        if sources is None:
            self._fast.trunk = None
            return None
        key = _weights_key(sources)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(sources[0].device.type, enabled=False):
            folded = _FoldedResNet(visual)
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
        """open_clip's AttentionPool2d (`AttentionPool2d.forward`) on RoIAligned C5, without projecting
        the RoI's tokens. Only the mean token's output is kept, so only its query q is needed, and
        per head h the rest is linear in the RoI's tokens x_l (before the positional embedding):
            score_hl = q_h · (W_k x_l + W_k pos_l + b_k)_h = (W_k,hᵀ q_h) · x_l + q_h · (W_k pos_l + b_k)_h
            out_h    = a_h0 v0_h + W_v,h (Σ_l a_hl x_l) + Σ_l a_hl (W_v pos_l + b_v)_h
        (W_k,h: head h's rows of W_k; a: the softmax over the mean token 0 and the L RoI tokens). The
        mean token (mean_l x_l + pos_0) is projected as before. Per RoI that is ~5 C² + 2 H C L
        multiply-adds instead of 3 C² (L + 1): RN50x16 (C 3072, H 48, L 144), 0.09 G instead of 4.1 G.
        Nothing per image is needed, so chunked calls on one image repeat nothing. None: not applicable."""
        pool = self.clip.visual.attnpool
        n_tok = output_size * output_size
        r = rois.shape[0]
        if (type(pool) is not AttentionPool2d or pool.positional_embedding.shape[0] != n_tok + 1 or r == 0
                or c5.shape[1] % pool.num_heads):
            return None
        sources = _pool_sources(pool)
        consts, self._fast.pool = self._cached(self._fast.pool, _weights_key(sources), sources[0].device,
                                               lambda: _pool_constants(pool))
        c = c5.shape[1]
        heads = pool.num_heads
        d = c // heads
        x = roi_align(c5.float(), rois.float(), output_size, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
        x = x.to(c5.dtype).view(r, c, n_tok)  # [R, C, L]: the RoI's tokens before the positional embedding
        dtype = x.dtype
        mean_tok = x.mean(dim=-1) + pool.positional_embedding[0].to(dtype)  # [R, C]
        q = F.linear(mean_tok, pool.q_proj.weight, pool.q_proj.bias)
        k0 = F.linear(mean_tok, pool.k_proj.weight, pool.k_proj.bias)
        v0 = F.linear(mean_tok, pool.v_proj.weight, pool.v_proj.bias)
        q = (q * d**-0.5).view(r, heads, d)  # scaled_dot_product_attention's default scale 1/√d
        w_k = pool.k_proj.weight.view(heads, d, c)
        w_v = pool.v_proj.weight.view(heads, d, c)
        u = torch.matmul(q.transpose(0, 1), w_k).transpose(0, 1)  # [R, H, C]: W_k,hᵀ q_h
        scores = torch.matmul(u, x)  # [R, H, L]
        scores = scores + torch.matmul(q.unsqueeze(2), consts["k_pos"].to(q.dtype)).squeeze(2)  # q_h·(W_k pos + b_k)_h
        score0 = (q * k0.view(r, heads, d)).sum(dim=-1, keepdim=True)  # [R, H, 1]
        attn = torch.cat([score0, scores], dim=-1).softmax(dim=-1)  # [R, H, 1 + L]
        a0, a = attn[..., :1], attn[..., 1:]
        z = torch.matmul(a, x.transpose(1, 2))  # [R, H, C]: Σ_l a_hl x_l
        out = torch.matmul(z.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1)  # [R, H, d]: W_v,h z_h
        v_pos = consts["v_pos"]  # [H, L, d]
        out = out + torch.matmul(a.transpose(0, 1), v_pos.to(a.dtype)).transpose(0, 1) + a0 * v0.view(r, heads, d)
        return F.linear(out.reshape(r, c), pool.c_proj.weight, pool.c_proj.bias)

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
