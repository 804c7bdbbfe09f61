"""CLIP text embeddings computed on the shortest exact prefix of the token sequence.

open_clip's `encode_text` runs every one of the model's context positions (77 for CLIP) through
the text transformer, although vocabulary prompts such as "a photo of a {}." are ~10 tokens and
the rest is padding. `encode_text_truncated` returns the same embeddings from the first L
positions only, L being one past the furthest position that the pooling reads (see below); for
the 14 ViLD templates over LVIS that is ~15 of 77 positions, several times less work.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

__all__ = ["encode_text_truncated"]


class _TextTower(NamedTuple):
    """The pieces of one open_clip causal text tower (fields as open_clip names them)."""

    token_embedding: nn.Module
    positional_embedding: torch.Tensor
    transformer: nn.Module
    attn_mask: torch.Tensor
    ln_final: nn.Module
    text_projection: Optional[nn.Module | torch.Tensor]
    pool_type: str
    eos_id: Optional[int]


def _is_causal(mask: Optional[torch.Tensor], n: int) -> bool:
    """An additive float [n, n] mask with -inf everywhere above the diagonal (no query sees a
    later key). What it holds on and below the diagonal is free: truncation only slices it."""
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (n, n) or not mask.is_floating_point():
        return False
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu_(1)
    return bool(torch.isneginf(mask[above]).all())


def _text_tower(model: nn.Module) -> Optional[_TextTower]:
    """The tower of an open_clip `CLIP`, or of a `CustomTextCLIP` whose text side is open_clip's
    own `TextTransformer`, whose `encode_text` provably equals the truncated computation. None
    (meaning: run the model's own `encode_text`) for anything else: other classes or overridden
    methods, HF text towers, towers with a class token, a padding mask or bidirectional attention,
    transformers or blocks that are not open_clip's."""
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import (
            CustomResidualAttentionBlock,
            ResidualAttentionBlock,
            TextTransformer,
            Transformer,
        )
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None

    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        tower = _TextTower(
            model.token_embedding,
            model.positional_embedding,
            model.transformer,
            getattr(model, "attn_mask", None),
            model.ln_final,
            model.text_projection,
            model.text_pool_type,
            getattr(model, "text_eos_id", None),
        )
    elif isinstance(model, CustomTextCLIP) and type(model).encode_text is CustomTextCLIP.encode_text:
        text = model.text
        if (
            type(text) is not TextTransformer
            or text.cls_emb is not None  # CoCa-style appended class token: pooled from the last position
            or text.use_pad_mask
            or text.output_tokens  # encode_text would return (pooled, tokens)
        ):
            return None
        tower = _TextTower(
            text.token_embedding,
            text.positional_embedding,
            text.transformer,
            getattr(text, "attn_mask", None),
            text.ln_final,
            text.text_projection,
            text.pool_type,
            getattr(text, "eos_id", None),
        )
    else:
        return None

    tr = tower.transformer
    if (
        type(tr) is not Transformer
        # open_clip >= 2.24: Transformer.forward takes [N, L, D] whatever its internal layout
        or not isinstance(getattr(tr, "batch_first", None), bool)
        # blocks whose only cross-position operation is the masked self-attention
        or any(type(b) not in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in tr.resblocks)
        or tower.pool_type not in ("argmax", "eos", "first")
        or (tower.pool_type == "eos" and tower.eos_id is None)
    ):
        return None
    return tower


def _pooled_index(tokens: torch.Tensor, tower: _TextTower) -> torch.Tensor:
    """[N] the position that open_clip's `text_global_pool` reads in each row of `tokens`."""
    if tower.pool_type == "argmax":  # OpenAI tokenizer: EOT has the largest id (first one on ties)
        return tokens.argmax(dim=-1)
    if tower.pool_type == "eos":  # first eos (0 if a row has none), as open_clip computes it
        return (tokens == tower.eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)  # "first"


def encode_text_truncated(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`clip_model.encode_text(tokens)` (unnormalised [N, D]), running the text transformer on
    the first L token positions only, L = 1 + the furthest position the pooling reads in the batch.

    Why this is exact: in a causal text tower every step is per position (token and positional
    embeddings, LayerNorms, MLPs, residuals, layer scales, the final LayerNorm) except the
    self-attention, and its additive mask is -inf above the diagonal, so the query at position i
    gives zero weight to keys after i. By induction over the layers, the output at position i is
    a function of tokens[:, :i+1] alone, computed by the same operations whether or not later
    positions exist. The pooled embedding is the output at one position per row: the EOT token
    (`text_pool_type='argmax'`, the largest token id in OpenAI's tokenizer), the first eos id
    (`'eos'`) or position 0 (`'first'`). That index is computed from the full token row exactly
    as open_clip does, so with L = max(index) + 1 every pooled output lies inside the truncated
    sequence. The transformer therefore runs on tokens[:, :L] with the positional embedding
    sliced to [:L] and the causal mask to [:L, :L]; the rest (cast dtype from
    `transformer.get_cast_dtype()`, the final LayerNorm before pooling, a Linear or matrix
    `text_projection`) is open_clip's. Results agree up to float rounding (the matrix products
    have other shapes), not bit for bit.

    Anything this cannot prove exact falls back to `clip_model.encode_text(tokens)`: models that
    are not open_clip `CLIP`/`CustomTextCLIP` (or override `encode_text`), HF text towers, no
    causal mask (`attn_mask is None`) or a mask that is not causal, pooling `'last'` (nothing to
    drop) or `'none'`, class-token (CoCa) or padding-mask towers, custom transformer blocks, and
    token tensors whose length is not the model's context length.
    """
    tower = _text_tower(clip_model)
    n = tokens.shape[-1] if tokens.dim() == 2 else -1
    if (
        tower is None
        or tokens.shape[0] == 0
        or n != tower.positional_embedding.shape[0]
        or not _is_causal(tower.attn_mask, n)
    ):
        return clip_model.encode_text(tokens)

    idx = _pooled_index(tokens, tower)
    length = int(idx.max()) + 1
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens[:, :length]).to(cast_dtype)  # [N, L, D]
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), idx]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
