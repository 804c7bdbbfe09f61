"""`encode_text_truncated` equals open_clip's `encode_text` while running fewer positions.

The equality tests use tiny random towers (2 layers, width 64) so they run in seconds. The speed
comparison at RN50x16's text-tower size (width 768, 12 layers, 12 heads; a batch of 256 LVIS
prompts) takes minutes: it runs only with OVSAM_BENCH=1 (`OVSAM_BENCH=1 pytest -s -k bench`).
"""

from __future__ import annotations


import open_clip
import pytest
import torch
import torch.nn as nn

from ovsam_model import vocab as V
from ovsam_model.modeling.text_tower import encode_text_truncated

TOKENIZER = open_clip.get_tokenizer("RN50")
VISION = dict(image_size=64, layers=[1, 1, 1, 1], width=8)  # the smallest ModifiedResNet: unused here
LONG = " ".join(["photograph"] * 100)  # fills the 77 context: the tokenizer truncates it, EOT at 76
PROMPTS = [
    "",  # [SOT, EOT]: the EOT at position 1
    "a photo of a cat.",
    "There is a large tape (sticky cloth in the scene.",
    "x",
    "a photo of a medium Lincoln Continental Mark II convertible with whitewall tyres.",
]


def tiny_text_cfg(**kw) -> dict:
    return dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, **kw)


def tiny_clip(custom_text: bool = False, cast_dtype=None, **text_kw) -> nn.Module:
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = cls(embed_dim=32, vision_cfg=VISION, text_cfg=tiny_text_cfg(**text_kw), cast_dtype=cast_dtype)
    return model.eval()


def eot_length(tokens: torch.Tensor) -> int:
    """1 + the last non-padding position over the batch (independently of the implementation)."""
    nonpad = (tokens != 0).long() * torch.arange(tokens.shape[1])
    return int(nonpad.max()) + 1


class SeqLen:
    """Records the sequence length each call of a text transformer sees ([N, L, D] input)."""

    def __init__(self, transformer: nn.Module):
        self.seen: list[int] = []
        self.handle = transformer.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].shape[1]))

    def __enter__(self) -> "SeqLen":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def text_transformer(model: nn.Module) -> nn.Module:
    return model.text.transformer if isinstance(model, open_clip.model.CustomTextCLIP) else model.transformer


def check_same(model: nn.Module, texts: list[str], expect_len: int | None, tol: float = 1e-5) -> torch.Tensor:
    """Truncated == open_clip's encode_text (max abs diff ≤ tol × output scale); the transformer
    ran on exactly expect_len positions (None: open_clip's own path, all of them)."""
    tokens = TOKENIZER(texts)
    with torch.no_grad():
        with SeqLen(text_transformer(model)) as full:
            ref = model.encode_text(tokens)
        with SeqLen(text_transformer(model)) as seq:
            out = encode_text_truncated(model, tokens)
    assert full.seen[0] >= 77  # 78 with a CoCa class token
    assert seq.seen == (full.seen if expect_len is None else [expect_len])
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    assert scale > 0
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} × scale {scale:.3g}"
    return out


def test_truncated_equals_open_clip_and_runs_only_the_longest_prompt() -> None:
    model = tiny_clip()
    tokens = TOKENIZER(PROMPTS)
    length = eot_length(tokens)
    assert 10 < length < 40
    # the longest prompt's EOT sits at the last kept position: an L one short would drop it
    assert int(tokens.argmax(dim=-1).max()) == length - 1
    out = check_same(model, PROMPTS, length)
    # per row: each prompt alone (the empty one runs 2 positions) gives its own batch's row
    for i, text in enumerate(PROMPTS):
        alone = check_same(model, [text], eot_length(TOKENIZER([text])))
        torch.testing.assert_close(alone[0], out[i], rtol=0, atol=1e-5 * out.abs().max().item())


def test_prompt_filling_the_context_keeps_all_positions() -> None:
    model = tiny_clip()
    tokens = TOKENIZER([LONG])
    assert int(tokens[0].argmax()) == 76 and bool((tokens[0] != 0).all())  # truncated, EOT last
    check_same(model, PROMPTS + [LONG], 77)


@pytest.mark.parametrize("proj_bias", [False, True])  # text_projection: a matrix, or nn.Linear
def test_projection_variants(proj_bias: bool) -> None:
    model = tiny_clip(proj_bias=proj_bias)
    assert isinstance(model.text_projection, nn.Linear) == proj_bias
    check_same(model, PROMPTS, eot_length(TOKENIZER(PROMPTS)))


def test_seq_first_attention_layout() -> None:
    """Blocks whose attention runs [L, N, D] (Transformer.batch_first False): the transformer
    transposes internally, the truncated input stays [N, L, D]."""
    model = tiny_clip()
    model.transformer.batch_first = False
    for blk in model.transformer.resblocks:
        blk.attn.batch_first = False
    check_same(model, PROMPTS, eot_length(TOKENIZER(PROMPTS)))


def test_eos_and_first_pooling() -> None:
    model = tiny_clip()
    tokens = TOKENIZER(PROMPTS)
    model.text_pool_type, model.text_eos_id = "eos", TOKENIZER.eot_token_id
    check_same(model, PROMPTS, eot_length(tokens))
    model.text_pool_type = "first"  # position 0 depends on nothing after it
    check_same(model, PROMPTS, 1)


def test_custom_text_clip_with_open_clip_text_transformer() -> None:
    model = tiny_clip(custom_text=True)
    check_same(model, PROMPTS, eot_length(TOKENIZER(PROMPTS)))


def test_custom_blocks() -> None:
    """CustomResidualAttentionBlock (qk-norm, head scaling, inner norms) is per position too."""
    model = tiny_clip(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_fc=True)
    assert type(model.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    check_same(model, PROMPTS, eot_length(TOKENIZER(PROMPTS)))


def test_low_precision_cast_dtype() -> None:
    model = tiny_clip(cast_dtype=torch.bfloat16)
    open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16)
    assert model.transformer.get_cast_dtype() == torch.bfloat16
    out = check_same(model, PROMPTS, eot_length(TOKENIZER(PROMPTS)), tol=3e-2)
    assert out.dtype == torch.bfloat16


def test_unsupported_models_fall_back_to_open_clip() -> None:
    # pooling that reads the last position: nothing to drop
    model = tiny_clip()
    model.text_pool_type = "last"
    check_same(model, PROMPTS, None)
    # bidirectional tower (no causal mask): every position sees every other one
    model = tiny_clip(custom_text=True, no_causal_mask=True, pool_type="argmax")
    assert model.text.attn_mask is None
    check_same(model, PROMPTS, None)
    # a mask that is not causal
    model = tiny_clip()
    model.attn_mask = torch.zeros(77, 77)
    check_same(model, PROMPTS, None)
    # CoCa-style class token appended after the text
    model = tiny_clip(custom_text=True, embed_cls=True)
    check_same(model, PROMPTS, None)


def test_other_models_use_their_own_encode_text() -> None:
    class Fake(nn.Module):
        def encode_text(self, tokens):
            return tokens[:, :3].float()

    tokens = TOKENIZER(PROMPTS)
    torch.testing.assert_close(encode_text_truncated(Fake(), tokens), tokens[:, :3].float())

    class Subclass(open_clip.model.CLIP):  # an override of encode_text is respected
        def encode_text(self, text, normalize: bool = False):
            return super().encode_text(text, normalize=True)

    torch.manual_seed(0)
    model = Subclass(embed_dim=32, vision_cfg=VISION, text_cfg=tiny_text_cfg()).eval()
    check_same(model, PROMPTS, None)


def test_vocabulary_encoder_uses_truncation() -> None:
    model = tiny_clip()
    enc = V.OpenClipTextEncoder(model, TOKENIZER, cache_key=None, batch_size=3)
    with torch.no_grad():
        ref = model.encode_text(TOKENIZER(PROMPTS))
    with SeqLen(model.transformer) as seq:
        out = enc.encode_text(PROMPTS)
    assert seq.seen == [eot_length(TOKENIZER(PROMPTS[:3])), eot_length(TOKENIZER(PROMPTS[3:]))]
    assert max(seq.seen) < 77
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_clip_trunk_encode_text_uses_truncation() -> None:
    """ClipTrunk.encode_text (the predictor's text side) runs only the longest prompt's length."""
    from ovsam_model.config import TINY
    from ovsam_model.modeling.clip_trunk import ClipTrunk

    torch.manual_seed(0)
    trunk = ClipTrunk(TINY.clip)
    with torch.no_grad():
        ref = trunk.clip.encode_text(trunk.tokenizer(PROMPTS)).float()
    with SeqLen(trunk.clip.transformer) as seq:
        out = trunk.encode_text(PROMPTS, batch_size=4)
    assert seq.seen == [eot_length(trunk.tokenizer(PROMPTS[:4])), eot_length(trunk.tokenizer(PROMPTS[4:]))]
    assert max(seq.seen) < 77
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
