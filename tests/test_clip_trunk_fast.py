"""ClipTrunk's fast paths (`fast_path=True`: folded BatchNorm + channels_last trunk, projected
attention pool) against open_clip's own modules (`fast_path=False`), on real images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovsam_model.modeling import attnpool_rois, folded_resnet
from ovsam_model.config import TINY
from ovsam_model.modeling.clip_trunk import ClipTrunk
from ovsam_model.transforms import prepare_image

SIZE = 512  # model-frame side: C5 is 16×16 (the RoI grid is 12×12)
ROI = 12


def _rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    ref, other = ref.double(), other.double()
    return float((ref - other).abs().max() / ref.abs().max())


def _randomise(trunk: ClipTrunk, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine terms, attention-pool biases and positional
    embedding (open_clip's init leaves means 0, variances 1, biases 0: a fold that dropped a term
    would still agree). Through load_state_dict, as a checkpoint would arrive."""
    g = torch.Generator().manual_seed(seed)
    state = trunk.state_dict()
    for key, value in state.items():
        if not key.startswith("clip.visual.") or not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) * 1.5 + 0.5)
        elif key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=g) * 0.2)
        elif (".bn" in key or "downsample.2" in key) and key.endswith("weight"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif (".bn" in key or "downsample.2" in key) and key.endswith("bias"):
            value.copy_(torch.randn(value.shape, generator=g) * 0.2)
        elif "attnpool" in key and (key.endswith("bias") or "positional" in key):
            value.copy_(torch.randn(value.shape, generator=g) * 0.5)
        elif key.endswith("conv1.weight") and "layer" not in key:
            value.mul_(1 + 0.1 * seed)  # the stem conv differs between seeds
    trunk.load_state_dict(state)


def _build(seed: int) -> ClipTrunk:
    torch.manual_seed(seed)
    trunk = ClipTrunk(TINY.clip)
    _randomise(trunk, seed)
    return trunk


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixels(data_dir) -> torch.Tensor:
    images = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:2]
    return torch.stack([prepare_image(np.array(Image.open(p).convert("RGB")), size=SIZE).pixels for p in images])


@pytest.fixture(scope="module")
def small(pixels) -> torch.Tensor:
    """One image at 256² (C5 8×8) for the tests that build trunks of their own."""
    return F.interpolate(pixels[:1], size=(256, 256), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def trunk() -> ClipTrunk:
    return _build(0)


@pytest.fixture(scope="module")
def plain_feats(trunk, pixels) -> list[torch.Tensor]:
    trunk.fast_path = False
    with torch.no_grad():
        feats = trunk(pixels)
    trunk.fast_path = True
    return feats


def _plain(trunk: ClipTrunk, fn):
    trunk.fast_path = False
    try:
        return fn()
    finally:
        trunk.fast_path = True


ROIS = torch.tensor([
    [0, 10.0, 20.0, 300.0, 200.0],  # ordinary
    [1, 0.0, 0.0, 512.0, 512.0],  # the whole frame
    [0, 200.0, 200.0, 200.5, 200.7],  # tiny (under a C5 cell)
    [1, 100.0, 100.0, 101.0, 101.0],  # a pixel
    [0, -80.0, -60.0, 40.0, 30.0],  # partly outside (top-left)
    [1, 450.0, 470.0, 700.0, 650.0],  # partly outside (bottom-right)
    [0, 600.0, 600.0, 700.0, 800.0],  # entirely outside: every sample is zero
    [1, 30.0, 400.0, 90.0, 410.0],  # thin
    [1, 256.0, 0.0, 512.0, 128.0],
])


def _many_rois(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 560 - 40
    wh = torch.rand(n, 2, generator=g) ** 2 * 400 + 0.5
    return torch.cat([torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + wh], dim=1)


def test_region_embed_fast_equals_attention_pool(trunk, plain_feats):
    c5 = plain_feats[3]
    rois = torch.cat([ROIS, _many_rois(40)])
    with torch.no_grad():
        ref = _plain(trunk, lambda: trunk.region_embed(c5, rois, ROI))
        fast = trunk.region_embed(c5, rois, ROI)
        one_image = trunk.region_embed(c5[1:2], torch.cat([torch.zeros(3, 1), ROIS[[1, 3, 5], 1:]], dim=1), ROI)
    assert fast.shape == ref.shape == (len(rois), TINY.clip.embed_dim) and fast.dtype == ref.dtype == torch.float32
    assert _rel(ref, fast) <= 1e-5
    assert _rel(ref[[1, 3, 5]], one_image) <= 1e-5  # a one-image C5 view, as `decode` passes it
    # per-row relative error too: tiny and outside RoIs have small outputs of their own
    row_scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((ref - fast).abs() / row_scale).max() <= 1e-5
    assert trunk.region_embed(c5, rois[:0], ROI).shape == ref[:0].shape


def test_region_embed_fast_under_bf16_autocast(trunk, plain_feats):
    c5 = plain_feats[3].bfloat16()  # what the trunk returns under autocast
    rois = torch.cat([ROIS, _many_rois(20, seed=1)])
    with torch.no_grad():
        exact = _plain(trunk, lambda: trunk.region_embed(plain_feats[3], rois, ROI))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = _plain(trunk, lambda: trunk.region_embed(c5, rois, ROI))
            fast = trunk.region_embed(c5, rois, ROI)
    assert fast.dtype == ref.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: both paths are within a few bf16 steps of the fp32 result
    assert _rel(exact, ref) <= 2e-2 and _rel(exact, fast) <= 2e-2
    assert _rel(ref, fast) <= 2e-2


def test_trunk_forward_fast_equals_open_clip(trunk, pixels, plain_feats):
    visual = trunk.clip.visual
    with torch.no_grad():  # fast_path=False is open_clip's modules exactly
        x = visual.stem(pixels)
        for layer, feat in zip((visual.layer1, visual.layer2, visual.layer3, visual.layer4), plain_feats):
            x = layer(x)
            assert torch.equal(x, feat)
        fast = trunk(pixels)
    assert len(fast) == 4
    for ref, got, channels in zip(plain_feats, fast, TINY.clip.channels):
        assert got.shape == ref.shape and got.shape[1] == channels and got.dtype == ref.dtype
        assert got.is_contiguous()  # the usual NCHW layout for downstream .view/.reshape
        assert _rel(ref, got) <= 1e-4


def test_fast_forward_leaves_the_state_dict_and_grads_alone(small):
    trunk = _build(0)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    n_params, n_buffers = len(list(trunk.parameters())), len(list(trunk.buffers()))
    out = trunk(small)  # grad mode on: frozen weights, so nothing requires grad
    assert not any(f.requires_grad for f in out)
    after = trunk.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (len(list(trunk.parameters())), len(list(trunk.buffers()))) == (n_params, n_buffers)
    assert not trunk.train().clip.training  # the frozen trunk stays in eval mode (what folding needs)
    assert not any(p.requires_grad for p in trunk.parameters())
    folded = trunk._fast.trunk[1]
    derived = [c.weight for c in folded.stem] + [c.bias for c in folded.stem]
    for layer in folded.layers:
        for block in layer:
            convs = [block.conv1, block.conv2, block.conv3] + ([block.down] if block.down else [])
            derived += [t for c in convs for t in (c.weight, c.bias)]
    assert derived and not any(t.requires_grad for t in derived)
    emb = trunk.region_embed(out[3], ROIS, ROI)
    assert not emb.requires_grad
    assert not any(t.requires_grad for t in trunk._fast.pool[1].values())
    # a copy starts without the derived tensors and computes the same
    clone = copy.deepcopy(trunk)
    assert clone._fast.trunk is None
    with torch.no_grad():
        assert torch.equal(clone(small)[3], trunk(small)[3])


def test_new_weights_after_a_fast_forward_are_used(small):
    trunk, other = _build(0), _build(1)
    with torch.no_grad():
        first = trunk(small)
        first_emb = trunk.region_embed(first[3], ROIS[[0, 2, 4]] * torch.tensor([0, 1, 1, 1, 1]), ROI)
        trunk.load_state_dict(other.state_dict())  # e.g. `ovsam weights` / a finetune checkpoint
        fast = trunk(small)
        ref = _plain(other, lambda: other(small))
        rois = ROIS[[0, 2, 4]] * torch.tensor([0, 1, 1, 1, 1])
        emb = trunk.region_embed(ref[3], rois, ROI)
        ref_emb = _plain(other, lambda: other.region_embed(ref[3], rois, ROI))
    for a, b, old in zip(ref, fast, first):
        assert _rel(a, b) <= 1e-4 and _rel(a, old) > 1e-2
    assert _rel(ref_emb, emb) <= 1e-5 and _rel(ref_emb, first_emb) > 1e-2
    # an in-place write to one BatchNorm statistic (version-counted) is seen too
    with torch.no_grad():
        trunk.clip.visual.layer4[0].bn2.running_mean.add_(0.5)
        trunk.clip.visual.attnpool.v_proj.bias.add_(0.5)
        fast = trunk(small)
        ref = _plain(trunk, lambda: trunk(small))
        emb = trunk.region_embed(ref[3], rois, ROI)
        ref_emb = _plain(trunk, lambda: trunk.region_embed(ref[3], rois, ROI))
    assert _rel(ref[3], fast[3]) <= 1e-4 and _rel(ref_emb, emb) <= 1e-5
    # a load into the submodule (`weights` loads open_clip files into `trunk.clip`) skips the
    # trunk's load hook: the version counters still see it
    state = trunk.clip.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean") and "visual" in key:
            state[key] = value + 0.3
    with torch.no_grad():
        trunk.clip.load_state_dict(state)
        fast = trunk(small)
        ref = _plain(trunk, lambda: trunk(small))
    assert _rel(ref[3], fast[3]) <= 1e-4


def test_dtype_change_and_inference_mode(small):
    trunk = _build(2)
    x = small[..., :128, :128]  # C5 4×4: fp64 convs are slow
    with torch.inference_mode():  # the predictor's mode: what it derives must still serve later calls
        trunk(x)
        trunk.region_embed(trunk(x)[3], ROIS[:2] * torch.tensor([0, 1, 1, 1, 1]), ROI)
    x = x.clone().requires_grad_()
    trunk(x)[3].sum().backward()  # (tensors made in inference mode cannot be saved for backward)
    assert x.grad is not None and x.grad.abs().sum() > 0
    trunk.to(torch.float64)
    x = small[..., :128, :128].double()
    with torch.no_grad():
        fast = trunk(x)
        ref = _plain(trunk, lambda: trunk(x))
        emb = trunk.region_embed(ref[3], ROIS[:3] * torch.tensor([0, 1, 1, 1, 1]), ROI)
        ref_emb = _plain(trunk, lambda: trunk.region_embed(ref[3], ROIS[:3] * torch.tensor([0, 1, 1, 1, 1]), ROI))
    assert fast[3].dtype == emb.dtype == torch.float64
    assert _rel(ref[3], fast[3]) <= 1e-10
    assert _rel(ref_emb, emb) <= 1e-10
    # gradients flow through the fast trunk to the pixels as through the plain one
    x = small[..., :128, :128].double().requires_grad_()
    trunk(x)[3].sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    _plain(trunk, lambda: trunk(x))[3].sum().backward()
    assert _rel(x.grad, g_fast) <= 1e-10


def _broken_pool_constants(pool):
    consts = clip_trunk_pool_constants(pool)
    heads = pool.num_heads
    bias = pool.v_proj.bias.view(heads, 1, -1)
    return {**consts, "v_pos": consts["v_pos"] - bias}  # the spatial tokens' value bias left out


clip_trunk_pool_constants = attnpool_rois.pool_constants


def _conv_without_bias(self, x):
    return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("mutant", ["value_bias", "bn_bias", "mean_token_position"])
def test_the_comparisons_catch_a_broken_rewrite(monkeypatch, trunk, pixels, plain_feats, mutant):
    """The tolerances above are tight enough to see a dropped term."""
    c5 = plain_feats[3]
    with torch.no_grad():
        ref = _plain(trunk, lambda: trunk.region_embed(c5, ROIS, ROI))
    try:
        if mutant == "value_bias":
            monkeypatch.setattr(attnpool_rois, "pool_constants", _broken_pool_constants)
            trunk.clear_fast_cache()
            with torch.no_grad():
                assert _rel(ref, trunk.region_embed(c5, ROIS, ROI)) > 1e-3
        elif mutant == "bn_bias":
            monkeypatch.setattr(folded_resnet.FoldedConv, "__call__", _conv_without_bias)
            with torch.no_grad():
                assert _rel(plain_feats[3][:1], trunk(pixels[:1])[3]) > 1e-2
        else:  # the mean token without its positional embedding, in both paths' terms
            pos = trunk.clip.visual.attnpool.positional_embedding
            saved = pos[0].clone()
            with torch.no_grad():
                pos[0].zero_()
                try:
                    wrong = _plain(trunk, lambda: trunk.region_embed(c5, ROIS, ROI))
                finally:
                    pos[0].copy_(saved)
            assert _rel(ref, wrong) > 1e-3
    finally:
        trunk.clear_fast_cache()
