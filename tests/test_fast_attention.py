"""SDPA attention (`ovsam_model.modeling.fast_attention`) against segment-anything's own forward."""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT, add_decomposed_rel_pos
from torch import nn

from ovsam_model.builder import build_model, build_sam
from ovsam_model.modeling.fast_attention import SDPAAttention, decomposed_rel_pos_bias, use_sdpa
from ovsam_model.modeling.sam2clip import SAM2CLIPAdapter
from ovsam_model.train.teacher_cache import build_teacher

FP32_TOL = 1e-5  # max abs difference, relative to the largest output value
GRAD_TOL = 1e-4  # the same for every gradient


def make_block(dim: int, heads: int, window: int, grid: int, rel_pos: bool, seed: int = 0,
               input_size: int | None = None) -> Block:
    """A segment-anything Block with weights that make the test sensitive: qkv scaled up so the
    softmax is far from uniform (a wrong scale shows) and random relative positions (they are
    zero-initialised, which would hide a missing bias)."""
    torch.manual_seed(seed)
    size = input_size or grid
    block = Block(dim, heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                  use_rel_pos=rel_pos, window_size=window, input_size=(size, size))
    with torch.no_grad():
        block.attn.qkv.weight.mul_(3.0)
        if rel_pos:
            nn.init.normal_(block.attn.rel_pos_h)
            nn.init.normal_(block.attn.rel_pos_w)
    return block


def run(block: Block, x: torch.Tensor, fast: bool, backward: bool = False, dtype=None):
    """(attention output, block output, grads {name: grad} incl. "input") with the fast path on/off."""
    block.attn.fast_path = fast
    seen = []
    hook = block.attn.register_forward_hook(lambda m, i, o: seen.append(o))
    x = x.clone().requires_grad_(backward)
    block.zero_grad(set_to_none=True)
    try:
        if dtype is None:
            out = block(x)
        else:
            with torch.autocast("cpu", dtype=dtype):
                out = block(x)
    finally:
        hook.remove()
    grads = {}
    if backward:
        g = torch.Generator().manual_seed(1)
        (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        grads["input"] = x.grad.clone()
    return seen[0].detach().float(), out.detach().float(), grads


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


CASES = {
    # window 14 on a 16×16 grid: padded to 28×28, 4 windows (3 of them mostly padding)
    "window-relpos": dict(dim=32, heads=2, window=14, grid=16, rel_pos=True),
    # a grid that is not square in windows: 30 → 42, 9 windows
    "window-relpos-30": dict(dim=32, heads=4, window=14, grid=30, rel_pos=True),
    "global-relpos": dict(dim=32, heads=2, window=0, grid=16, rel_pos=True),
    # relative positions made for another grid: get_rel_pos interpolates them
    "global-relpos-interp": dict(dim=32, heads=2, window=0, grid=12, rel_pos=True, input_size=8),
    "window-norelpos": dict(dim=32, heads=2, window=14, grid=16, rel_pos=False),
    "global-norelpos": dict(dim=32, heads=2, window=0, grid=16, rel_pos=False),
}


def test_bias_is_segment_anythings_rel_pos_term():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 6 * 5, 8, generator=g)
    rel_h, rel_w = torch.randn(11, 8, generator=g), torch.randn(9, 8, generator=g)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (6, 5), (6, 5))
    ref = add_decomposed_rel_pos(torch.zeros(6, 30, 30), q.reshape(6, 30, 8), rel_h, rel_w, (6, 5), (6, 5))
    assert bias.shape == (2, 3, 30, 30) and bias.is_contiguous()
    torch.testing.assert_close(bias.reshape(6, 30, 30), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_original_forward_and_backward(case):
    cfg = CASES[case]
    block = make_block(**cfg)
    assert use_sdpa(block) == 1 and type(block.attn) is SDPAAttention and block.attn.fast_path
    batch = 1 if cfg["window"] else 2  # windows already make the attention batch > 1
    x = torch.randn(batch, cfg["grid"], cfg["grid"], cfg["dim"], generator=torch.Generator().manual_seed(2))
    attn_ref, out_ref, g_ref = run(block, x, fast=False, backward=True)
    attn, out, g = run(block, x, fast=True, backward=True)
    assert attn.shape == attn_ref.shape
    assert rel_err(attn, attn_ref) <= FP32_TOL, case
    assert rel_err(out - x, out_ref - x) <= FP32_TOL, case
    assert g.keys() == g_ref.keys()
    if cfg["rel_pos"]:
        assert {"attn.rel_pos_h", "attn.rel_pos_w"} <= g.keys()
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) <= GRAD_TOL, (case, name, rel_err(g[name], g_ref[name]))


@pytest.mark.parametrize("case", ["window-relpos", "global-relpos", "global-norelpos"])
def test_sdpa_bf16_autocast(case):
    cfg = CASES[case]
    block = make_block(**cfg)
    use_sdpa(block)
    x = torch.randn(2, cfg["grid"], cfg["grid"], cfg["dim"], generator=torch.Generator().manual_seed(3))
    ref, _, _ = run(block, x, fast=False)
    orig_bf16, _, _ = run(block, x, fast=False, dtype=torch.bfloat16)
    fast_bf16, _, _ = run(block, x, fast=True, dtype=torch.bfloat16)
    # bf16 has an 8-bit mantissa: the original's own bf16 error is the yardstick
    baseline = rel_err(orig_bf16, ref)
    err = rel_err(fast_bf16, ref)
    assert err <= min(max(2 * baseline, 2e-2), 0.1), (err, baseline)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.attn(x[:, :8, :8]).dtype == torch.bfloat16


class _NoBias(SDPAAttention):
    def forward(self, x):
        use = self.use_rel_pos
        self.use_rel_pos = False
        try:
            return super().forward(x)
        finally:
            self.use_rel_pos = use


class _NoScale(SDPAAttention):
    def forward(self, x):
        scale = self.scale
        self.scale = 1.0
        try:
            return super().forward(x)
        finally:
            self.scale = scale


class _ScaledBias(SDPAAttention):
    """The bias computed from the scaled q (a plausible mistake)."""

    def forward(self, x):
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = decomposed_rel_pos_bias(q * self.scale, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


@pytest.mark.parametrize("broken", [_NoBias, _NoScale, _ScaledBias])
@pytest.mark.parametrize("case", ["window-relpos", "global-relpos"])
def test_comparison_catches_a_broken_forward(broken, case):
    """The tolerances above are far tighter than what a missing bias or scale changes."""
    cfg = CASES[case]
    block = make_block(**cfg)
    x = torch.randn(2, cfg["grid"], cfg["grid"], cfg["dim"], generator=torch.Generator().manual_seed(2))
    use_sdpa(block)
    ref, _, _ = run(block, x, fast=False)
    block.attn.__class__ = broken
    wrong, _, _ = run(block, x, fast=True)
    assert rel_err(wrong, ref) > 100 * FP32_TOL


def test_fast_path_off_is_segment_anythings_forward_and_state_dict_unchanged():
    block = make_block(32, 2, 0, 8, True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    params = dict(block.named_parameters())
    x = torch.randn(1, 8, 8, 32)
    y = block.attn(x)
    assert use_sdpa(block) == 1
    after = block.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[n] for n, p in block.named_parameters())
    block.attn.fast_path = False
    assert torch.equal(block.attn(x), y)  # bit-for-bit the original
    assert "fast_path" not in block.attn.state_dict()
    # toggling every fast path through modules(), as a helper would
    for m in block.modules():
        if hasattr(m, "fast_path"):
            m.fast_path = True
    assert block.attn.fast_path
    # survives pickling (ray workers) with its flag
    block.attn.fast_path = False
    clone = pickle.loads(pickle.dumps(block))
    assert type(clone.attn) is SDPAAttention and clone.attn.fast_path is False
    # strict loading of an original Block's state dict
    plain = make_block(32, 2, 0, 8, True, seed=5)
    block.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(block.attn.qkv.weight, plain.attn.qkv.weight)


def test_use_sdpa_counts_every_image_encoder_attention():
    enc = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                          use_rel_pos=True, window_size=4, global_attn_indexes=(2,))
    n_attn = sum(type(m) is Attention for m in enc.modules())
    assert n_attn == 3
    assert use_sdpa(enc) == 3
    assert use_sdpa(enc) == 3  # idempotent
    assert sum(type(m) is SDPAAttention for m in enc.modules()) == 3
    # a whole SAM from build_sam (the baselines', the teacher's) comes switched; only its image
    # encoder's attention is (the decoder's is another class)
    sam = build_sam("tiny")
    assert all(type(b.attn) is SDPAAttention and b.attn.fast_path for b in sam.image_encoder.blocks)
    assert not any(type(m) is Attention for m in sam.modules())
    assert use_sdpa(sam) == len(sam.image_encoder.blocks)


def test_teacher_and_registry_adapter_are_switched():
    teacher, _ = build_teacher("tiny", image_size=128, tiny_dims=(32, 16))
    assert all(type(b.attn) is SDPAAttention and b.attn.fast_path for b in teacher.blocks)
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast = teacher(pixels)
        for b in teacher.blocks:
            b.attn.fast_path = False
        assert rel_err(fast, teacher(pixels)) <= FP32_TOL
    model = build_model("tiny", random_weights=True)
    attns = [m for m in model.adapter.modules() if isinstance(m, Attention)]
    assert len(attns) == len(model.adapter.blocks) == model.cfg.adapter_depth
    assert all(type(a) is SDPAAttention and a.fast_path for a in attns)
    assert use_sdpa(model) == len(attns)


def test_adapter_trains_through_sdpa_like_the_original():
    """Distillation backpropagates through the adapter's blocks: same loss and gradients."""
    torch.manual_seed(0)
    adapter = SAM2CLIPAdapter((8, 16, 32, 64), embed_dim=32, depth=2, num_heads=2, window_size=14,
                              global_blocks=(1,), grid_size=20, out_chans=16)
    with torch.no_grad():
        nn.init.normal_(adapter.pos_embed, std=0.5)
        for b in adapter.blocks:
            nn.init.normal_(b.attn.rel_pos_h)
            nn.init.normal_(b.attn.rel_pos_w)
    attns = [b.attn for b in adapter.blocks]
    assert all(type(a) is SDPAAttention and a.fast_path for a in attns)
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, c, 20 * 4 // s, 20 * 4 // s, generator=g) for c, s in ((8, 1), (16, 2), (32, 4), (64, 8))]
    target = torch.randn(2, 16, 20, 20, generator=g)

    def step(fast):
        for a in attns:
            a.fast_path = fast
        adapter.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(adapter(feats), target)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in adapter.named_parameters()}

    loss_ref, g_ref = step(False)
    loss, grads = step(True)
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    for name in g_ref:
        assert rel_err(grads[name], g_ref[name]) <= GRAD_TOL, name
