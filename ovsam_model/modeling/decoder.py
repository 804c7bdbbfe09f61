"""OVSAM head: SAM's mask decoder with one mask token and no IoU branch, a label token and
its MLP, and the RoI projection `roi_conv` (spec §2).

Its state dict is the official `mask_decoder.*` layout minus the prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn
from torch.nn import functional as F


class OneTokenMaskDecoder(MaskDecoder):
    """`segment_anything` MaskDecoder(num_multimask_outputs=0) without the IoU token and head.

    The output tokens are [prefix tokens (the label token), mask token, sparse prompts...]:
    with SAM's IoU token as the prefix this is exactly SAM's single-mask path.
    """

    def __init__(self, transformer_dim: int, transformer: nn.Module) -> None:
        super().__init__(transformer_dim=transformer_dim, transformer=transformer, num_multimask_outputs=0)
        del self.iou_token
        del self.iou_prediction_head

    def predict(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        prefix_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on ONE image.

        image_embedding: [1, C, h, w]; image_pe: [1, C, h, w]; sparse: [N, T, C];
        dense: [N, C, h, w] (may be an expanded view); prefix_tokens: [P, C].
        Returns mask logits [N, 1, 4h, 4w] and the prefix tokens' outputs [N, P, C].
        The image embedding is broadcast, never copied per prompt before the transformer.
        """
        n = sparse.shape[0]
        num_prefix = prefix_tokens.shape[0]
        output_tokens = torch.cat([prefix_tokens, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = image_embedding + dense  # one [N, C, h, w] allocation
        pos_src = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        prefix_out = hs[:, :num_prefix, :]
        mask_token_out = hs[:, num_prefix, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper = self.output_hypernetworks_mlps[0](mask_token_out)  # [N, C/8]
        b, c8, uh, uw = upscaled.shape
        masks = torch.bmm(hyper.unsqueeze(1), upscaled.view(b, c8, uh * uw)).view(b, 1, uh, uw)
        return masks, prefix_out


class ConvReLU(nn.Module):
    """1×1 conv without bias, then ReLU (official key names: `.conv.weight`)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class OVSAMHead(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 256,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
        fpn_dim: int = 256,
        embed_dim: int = 768,
        label_token_enabled: bool = False,
    ) -> None:
        super().__init__()
        transformer = TwoWayTransformer(depth=depth, embedding_dim=transformer_dim, mlp_dim=mlp_dim, num_heads=num_heads)
        self.mask_decoder = OneTokenMaskDecoder(transformer_dim, transformer)
        self.label_token = nn.Embedding(1, transformer_dim)
        self.label_mlp = MLP(transformer_dim, transformer_dim, embed_dim, 3)
        self.roi_conv = nn.Sequential(ConvReLU(fpn_dim, embed_dim))
        # Released checkpoints multiply the label branch by zero (the token still shapes the masks).
        self.label_token_enabled = label_token_enabled

    def decode(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ mask logits [N, 1, 4h, 4w] and the label branch's embedding [N, embed_dim]."""
        masks, prefix_out = self.mask_decoder.predict(image_embedding, image_pe, sparse, dense, self.label_token.weight)
        label = self.label_mlp(prefix_out[:, 0, :])
        return masks, label

    def region_embed(self, roi_feats: torch.Tensor, label_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoI features [R, fpn_dim, S, S] → [R, embed_dim]: roi_conv + ReLU, mean over the RoI."""
        region = self.roi_conv(roi_feats).mean(dim=(2, 3))
        if label_embed is not None:
            region = region + (label_embed if self.label_token_enabled else label_embed * 0.0)
        return region


SAM_DECODER_DROPPED = ("iou_token.", "iou_prediction_head.", "output_hypernetworks_mlps.1.",
                       "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3.")


def one_token_state_from_sam(sam_decoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM's `mask_decoder.*` state (prefix removed) → the state of `OneTokenMaskDecoder`: the IoU
    token and head and the multimask tokens' MLPs dropped, the single-mask token 0 kept
    (spec §2: CLIP2SAM's decoder starts from SAM's)."""
    out = {k: v for k, v in sam_decoder_state.items() if not k.startswith(SAM_DECODER_DROPPED)}
    out["mask_tokens.weight"] = sam_decoder_state["mask_tokens.weight"][:1]
    return out
