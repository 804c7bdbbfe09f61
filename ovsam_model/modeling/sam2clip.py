"""SAM2CLIP adapter: CLIP C2..C5 → SAM's 256×64×64 image-embedding format (spec §2).

Its state dict is the official `neck_student.*` layout minus the prefix. Its blocks' attention
runs `scaled_dot_product_attention` (`fast_attention.use_sdpa`; same parameters and keys).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn

from .fast_attention import use_sdpa


class PatchEmbed(nn.Module):
    """A projection to stride 16 (the official key names carry `.projection`)."""

    def __init__(self, projection: nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class SAM2CLIPAdapter(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int] = (384, 768, 1536, 3072),
        embed_dim: int = 1280,
        depth: int = 5,
        num_heads: int = 16,
        window_size: int = 14,
        global_blocks: Sequence[int] = (4,),
        grid_size: int = 64,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.patch_embeds = nn.ModuleList(
            [
                PatchEmbed(nn.Conv2d(c2, embed_dim, kernel_size=4, stride=4)),
                PatchEmbed(nn.Conv2d(c3, embed_dim, kernel_size=2, stride=2)),
                PatchEmbed(nn.Conv2d(c4, embed_dim, kernel_size=1, stride=1)),
                PatchEmbed(nn.ConvTranspose2d(c5, embed_dim, kernel_size=2, stride=2)),
            ]
        )
        self.level_encoding = nn.Embedding(4, embed_dim)
        # SAM ViT-H's absolute position embedding, copied once and kept fixed: a stored buffer.
        self.register_buffer("pos_embed", torch.zeros(1, grid_size, grid_size, embed_dim), persistent=True)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=4.0,
                    qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    act_layer=nn.GELU,
                    use_rel_pos=True,
                    rel_pos_zero_init=True,
                    window_size=0 if i in global_blocks else window_size,
                    input_size=(grid_size, grid_size),
                )
                for i in range(depth)
            ]
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        use_sdpa(self)  # the blocks' attention through SDPA (`fast_path`); state dict unchanged

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """[C2, C3, C4, C5] → [B, out_chans, grid, grid]."""
        x = None
        for level, (embed, feat) in enumerate(zip(self.patch_embeds, feats)):
            y = embed(feat) + self.level_encoding.weight[level].view(1, -1, 1, 1)
            x = y if x is None else x + y
        x = x.permute(0, 2, 3, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
