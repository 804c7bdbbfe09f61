"""`scaled_dot_product_attention` for segment-anything's ViT attention (image encoder, adapter).

segment-anything's `image_encoder.Attention.forward` builds the [B·heads, N, N] attention matrix
by hand (scaled q·kᵀ, plus the decomposed relative-position terms, softmax, ·v). `SDPAAttention`
computes the same thing with `torch.nn.functional.scaled_dot_product_attention`: q, k, v come
from the same `qkv` Linear, and the decomposed relative-position bias (computed as
segment-anything computes it, from the unscaled q) is passed as an additive float mask
[B, heads, N, N], as pytorch-labs' segment-anything-fast does; no mask without relative
positions. Parameters, buffers and state-dict keys are those of `Attention`.

`use_sdpa(module)` switches every segment-anything image-encoder `Attention` inside a module by
replacing the class of each instance with `SDPAAttention`. Each switched module has a boolean
`fast_path` (True once switched); `fast_path = False` runs segment-anything's own forward, so
that a helper can toggle all fast paths through `model.modules()`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """The additive attention bias of segment-anything's `add_decomposed_rel_pos`.

    q: [B, heads, q_h·q_w, C] (unscaled) → bias [B, heads, q_h·q_w, k_h·k_w] in q's dtype, such
    that `add_decomposed_rel_pos(attn, ...) == attn + bias` (up to rounding)."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)
    B, heads, _, dim = q.shape
    r_q = q.reshape(B * heads, q_h, q_w, dim)
    # contiguous (einsum's outputs need not be): the broadcast sum then comes out contiguous and
    # the reshape below is a view, not a second copy of the [B·heads, N, N] bias
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).contiguous()
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).contiguous()
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(B, heads, q_h * q_w, k_h * k_w).to(q.dtype)


class SDPAAttention(Attention):
    """segment-anything's image-encoder `Attention` with an SDPA forward (`fast_path`)."""

    fast_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path:
            return super().forward(x)
        B, H, W, _ = x.shape
        # qkv: (3, B, heads, H·W, head_dim), the same split as segment-anything's
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias: Optional[torch.Tensor] = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(x)


def use_sdpa(module: nn.Module) -> int:
    """Switch every segment-anything image-encoder `Attention` inside `module` (itself included)
    to the SDPA forward with `fast_path = True`; returns how many there are (those switched by
    an earlier call included). Parameters and state-dict keys do not change. Subclasses of
    `Attention` other than `SDPAAttention` keep their own forward and are not counted."""
    n = 0
    for m in module.modules():
        if type(m) is Attention:
            m.__class__ = SDPAAttention
        if isinstance(m, SDPAAttention):
            m.fast_path = True
            n += 1
    return n
