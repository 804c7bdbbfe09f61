"""OVSAM head: SAM's mask decoder with one mask token and no IoU branch, a label token and
its MLP, and the RoI projection `roi_conv` (spec §2).

Its state dict is the official `mask_decoder.*` layout minus the prefix.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import nn
from torch.nn import functional as F


class OneTokenMaskDecoder(MaskDecoder):
    """`segment_anything` MaskDecoder(num_multimask_outputs=0) without the IoU token and head.

    The output tokens are [prefix tokens (the label token), mask token, sparse prompts...]:
    with SAM's IoU token as the prefix token this equals segment-anything's
    `MaskDecoder(num_multimask_outputs=0)` (its single mask), NOT SAM's shipped 3-multimask
    decoder, whose extra tokens take part in attention. `one_token_state_from_sam` maps the
    shipped decoder's weights (its token 0, the single-mask token) into this layout.

    `fast_path` (default True) selects `_predict_fast`, the same function computed with fewer
    operations (equal up to float rounding); False runs exactly the plain code (`_predict_plain`).
    """

    fast_path: bool = True
    # Prompts per pass of the fast path's per-prompt part on CPU: small chunks keep the
    # intermediates small (reused heap memory, cache); 64 clicks, 1 thread: chunks of 4 3.6 s,
    # 2: 4.3 s, 8: 6.1 s, 64: 6.2 s. None (and any non-CPU device, and training, where autograd
    # keeps every chunk's intermediates: tiny-256 finetuning step 0.19 s in chunks of 4, 0.11 s
    # in one): all prompts at once. A short chunk is padded to this size, so that results do not
    # depend on the number of prompts.
    fast_chunk_cpu: Optional[int] = 4

    def __init__(self, transformer_dim: int, transformer: nn.Module) -> None:
        super().__init__(transformer_dim=transformer_dim, transformer=transformer, num_multimask_outputs=0)
        del self.iou_token
        del self.iou_prediction_head
        self.fast_path = True

    def predict(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        prefix_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on one image, or on several (training batches).

        image_embedding: [1, C, h, w] (one image: broadcast, never copied per prompt before the
        transformer) or [N, C, h, w] (each prompt's own image; may be a gathered copy);
        image_pe: [1, C, h, w]; sparse: [N, T, C]; dense: [N, C, h, w] (may be an expanded view);
        prefix_tokens: [P, C]. Returns mask logits [N, 1, 4h, 4w] and the prefix tokens' outputs [N, P, C].
        """
        if self.fast_path and sparse.shape[0] > 0 and self._fast_supported():
            return self._predict_fast(image_embedding, image_pe, sparse, dense, prefix_tokens)
        return self._predict_plain(image_embedding, image_pe, sparse, dense, prefix_tokens)

    def _predict_plain(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        prefix_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    # ---------------------------------------------------------------- fast path
    #
    # The same function as `_predict_plain`, rearranged (exact in real arithmetic):
    # - click/box-only prompts share one dense map, so the image side entering the transformer
    #   is one [1, HW, C] tensor: layer 1's token-to-image attention and the image queries of
    #   its image-to-token attention are computed once, not per prompt;
    # - token-to-image attention never projects the HW image tokens: the keys' projection is
    #   folded into the few queries (q_h·(W_k x + b_k) = (W_kᵀ q_h)·x + q_h·b_k), and the values'
    #   projection is applied after the attention average (Σ_p a_p (W_v x_p + b_v) =
    #   W_v Σ_p a_p x_p + b_v);
    # - image-to-token attention folds the image queries' projection into the T token keys
    #   (W_qᵀ k_t, plus the bias term q-bias·k_t, which does vary over t) and the output
    #   projection into the T values (W_o,h v_h,t): with H·T ≪ C the [HW, C/2] projections,
    #   their per-head copies and the [HW, C] output projection disappear (the folded products
    #   cost H·T per image token and channel instead of ~C: a win up to ~16 tokens per prompt);
    # - the image side stays in [HW, C] (NHWC) layout, so the two stride-2 2×2 transposed
    #   convolutions of `output_upscaling` are matrix products on channels-last data, the
    #   LayerNorm2d is `F.layer_norm` over the channel dim (same weight, bias, eps), and the
    #   hypernetwork product runs on that layout; the sub-pixel order is undone on the final
    #   one-channel logits only;
    # - the per-prompt part runs in chunks of prompts (see `fast_chunk_cpu`).
    # Autograd runs through it (same parameters), so training may use it.

    def _fast_supported(self) -> bool:
        t = self.transformer
        if not isinstance(t, TwoWayTransformer) or len(self.output_upscaling) != 5:
            return False
        ct1, ln, _, ct2, _ = self.output_upscaling
        for ct in (ct1, ct2):
            if not (isinstance(ct, nn.ConvTranspose2d) and ct.kernel_size == (2, 2) and ct.stride == (2, 2)
                    and ct.padding == (0, 0) and ct.output_padding == (0, 0) and ct.dilation == (1, 1)
                    and ct.groups == 1 and ct.bias is not None):
                return False
        return isinstance(ln, LayerNorm2d)

    @staticmethod
    def _dense_shared(dense: torch.Tensor) -> bool:
        """Whether every prompt has the same dense map (no mask prompts): an expanded view is
        recognised from its stride; a materialised copy (e.g. after a dtype cast) by value."""
        if dense.shape[0] == 1 or dense.stride(0) == 0:
            return True
        return bool(torch.equal(dense[1:], dense[:1].expand_as(dense[1:])))

    def _predict_fast(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        prefix_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = sparse.shape[0]
        num_prefix = prefix_tokens.shape[0]
        _, c, h, w = image_embedding.shape
        output_tokens = torch.cat([prefix_tokens, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        pos = image_pe[0].flatten(1).t()  # [HW, C]
        per_prompt = image_embedding.shape[0] > 1
        shared = not per_prompt and self._dense_shared(dense)
        if shared:
            keys0 = (image_embedding + dense[:1]).flatten(2).transpose(1, 2).contiguous()  # [1, HW, C]
            keys0_pos = keys0 + pos
        chunk = n if image_embedding.device.type != "cpu" or not self.fast_chunk_cpu else self.fast_chunk_cpu
        if torch.is_grad_enabled() and self.mask_tokens.weight.requires_grad:
            chunk = n  # training: autograd keeps every chunk's intermediates anyway; chunks only add operations
        masks, prefix = [], []
        for s in range(0, n, chunk):
            tok = tokens[s : s + chunk]
            rows = tok.shape[0]
            # a short last chunk is padded to the full chunk (repeating its last prompt): the
            # kernels then see the same shapes in every chunk, so a prompt's logits do not depend
            # on how many prompts came with it (bit-equal runs for any box batch)
            tok = _pad_rows(tok, chunk)
            if not shared:
                d = dense if dense.shape[0] == 1 else _pad_rows(dense[s : s + chunk], tok.shape[0])
                image = _pad_rows(image_embedding[s : s + chunk], tok.shape[0]) if per_prompt else image_embedding
                keys0 = (image + d).flatten(2).transpose(1, 2).contiguous()
                keys0_pos = keys0 + pos
            queries, keys = self._transformer_fast(keys0, keys0_pos, pos, tok)
            prefix.append(queries[:rows, :num_prefix, :])
            hyper = self.output_hypernetworks_mlps[0](queries[:, num_prefix, :])  # [chunk, C/8]
            masks.append(self._upscale_and_mask_fast(keys, hyper, h, w)[:rows])
        return torch.cat(masks), torch.cat(prefix)

    def _transformer_fast(
        self, keys: torch.Tensor, keys_pos: torch.Tensor, pos: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayTransformer.forward` for keys [1 or n, HW, C] (1: shared by all n prompts),
        keys_pos = keys + pos, pos [HW, C], tokens [n, T, C] → (queries [n, T, C], keys [n, HW, C])."""
        t = self.transformer
        queries = point_embedding
        for i, layer in enumerate(t.layers):
            if i > 0:
                keys_pos = keys + pos
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + point_embedding
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + point_embedding, keys_pos, keys)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            attn_out = _image_to_token(layer.cross_attn_image_to_token, keys_pos, queries + point_embedding,
                                       queries, queries.shape[0])
            keys = layer.norm4(attn_out.add_(keys))
        keys_pos = keys + pos
        attn_out = _token_to_image(t.final_attn_token_to_image, queries + point_embedding, keys_pos, keys)
        queries = t.norm_final_attn(queries + attn_out)
        return queries, keys

    def _upscale_and_mask_fast(self, keys: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """`output_upscaling` + the hypernetwork product on keys [n, HW, C] (NHWC) → [n, 1, 4h, 4w].

        A 2×2 stride-2 transposed convolution maps each input pixel to its own 2×2 output block:
        a matrix product [C_in] → [2, 2, C_out]. The outputs stay in (pixel, ky, kx, channel)
        order; only the final logits are permuted to image order."""
        ct1, ln, act1, ct2, act2 = self.output_upscaling
        n = keys.shape[0]
        c1, c2 = ct1.out_channels, ct2.out_channels
        w1 = ct1.weight.permute(2, 3, 1, 0).reshape(4 * c1, ct1.in_channels)
        w2 = ct2.weight.permute(2, 3, 1, 0).reshape(4 * c2, ct2.in_channels)
        x = F.linear(keys.reshape(-1, keys.shape[-1]), w1, ct1.bias.repeat(4)).view(-1, c1)
        x = act1(F.layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps))
        x = act2(F.linear(x, w2, ct2.bias.repeat(4)))  # [n·HW·4, 4·c2]
        logits = torch.bmm(x.view(n, -1, c2), hyper.unsqueeze(2).to(x.dtype))  # [n, HW·16, 1]
        # (i, j, ky1, kx1, ky2, kx2) → row 4i + 2·ky1 + ky2, column 4j + 2·kx1 + kx2
        logits = logits.view(n, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, 1, 4 * h, 4 * w)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [r, ...] with its last row repeated up to `rows` rows (x itself when r ≥ rows)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


def _token_to_image(attn: Attention, q_in: torch.Tensor, keys_pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`attn(q=q_in, k=keys_pos, v=keys)` with q_in [n, T, C] and keys, keys_pos [b, HW, C]
    (b = 1: shared by the n prompts, or b = n), without projecting the HW image tokens."""
    n, t, c = q_in.shape
    heads = attn.num_heads
    d = attn.internal_dim // heads
    q = attn.q_proj(q_in).view(n, t, heads, d)
    # keys' projection folded into the queries: q_h·(W_k x + b_k) = (W_kᵀ q_h)·x + q_h·b_k
    scale = 1.0 / math.sqrt(d)
    qk = torch.einsum("nthd,hdc->nhtc", q, attn.k_proj.weight.view(heads, d, c)).mul(scale).reshape(n, heads * t, c)
    # q_h·b_k is constant over the image and cancels in the softmax; it is kept (a cheap broadcast
    # add) so that k_proj.bias stays in the graph: DDP requires every parameter to be used.
    kb = torch.einsum("nthd,hd->nht", q, attn.k_proj.bias.view(heads, d)).mul(scale).reshape(n, heads * t, 1)
    hw = keys.shape[1]
    if keys.shape[0] == 1:  # one product for all prompts: [n·H·T, C] @ [C, HW]
        logits = torch.addmm(kb.reshape(n * heads * t, 1).to(keys_pos.dtype), qk.reshape(n * heads * t, c).to(
            keys_pos.dtype), keys_pos[0].t())
        a = torch.softmax(logits, dim=-1)
        ctx = (a @ keys[0]).view(n, heads, t, c)
    else:
        logits = torch.baddbmm(kb.to(keys_pos.dtype), qk.to(keys_pos.dtype), keys_pos.transpose(1, 2))
        a = torch.softmax(logits.view(n, heads * t, hw), dim=-1)
        ctx = torch.bmm(a, keys).view(n, heads, t, c)
    # values' projection after the attention average (the weights sum to 1, so the bias stays)
    v = torch.einsum("nhtc,hdc->nthd", ctx, attn.v_proj.weight.view(heads, d, c))
    v = v + attn.v_proj.bias.view(heads, d)
    return attn.out_proj(v.reshape(n, t, heads * d))


def _image_to_token(attn: Attention, keys_pos: torch.Tensor, q_tok: torch.Tensor, values: torch.Tensor,
                    n: int) -> torch.Tensor:
    """`attn(q=keys_pos, k=q_tok, v=values)` with keys_pos [b, HW, C] (b = 1 or n) and q_tok,
    values [n, T, C] → [n, HW, C], with the image side's projections folded into the T tokens."""
    _, t, c = q_tok.shape
    heads = attn.num_heads
    d = attn.internal_dim // heads
    scale = 1.0 / math.sqrt(d)
    k = attn.k_proj(q_tok).view(n, t, heads, d)
    v = attn.v_proj(values).view(n, t, heads, d)
    wq = attn.q_proj.weight.view(heads, d, c)
    kq = torch.einsum("nthd,hdc->nhtc", k, wq).mul(scale).reshape(n, heads * t, c)  # [n, H·T, C]
    bias = torch.einsum("nthd,hd->nht", k, attn.q_proj.bias.view(heads, d)).mul(scale).reshape(n, 1, heads * t)
    vo = torch.einsum("nthd,chd->nhtc", v, attn.out_proj.weight.view(c, heads, d)).reshape(n, heads * t, c)
    hw = keys_pos.shape[1]
    if keys_pos.shape[0] == 1:  # one product for all prompts: [HW, C] @ [C, n·H·T]
        logits = torch.addmm(bias.reshape(1, n * heads * t).to(keys_pos.dtype), keys_pos[0],
                             kq.reshape(n * heads * t, c).t().to(keys_pos.dtype))
        a = torch.softmax(logits.view(hw, n, heads, t), dim=-1).view(hw, n, heads * t).transpose(0, 1)
    else:
        logits = torch.baddbmm(bias.to(keys_pos.dtype), keys_pos, kq.to(keys_pos.dtype).transpose(1, 2))
        a = torch.softmax(logits.view(n, hw, heads, t), dim=-1).view(n, hw, heads * t)
    return torch.baddbmm(attn.out_proj.bias.to(a.dtype), a, vo.to(a.dtype))


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
