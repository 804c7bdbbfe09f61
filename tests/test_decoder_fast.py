"""The decoder's fast path (`OneTokenMaskDecoder.fast_path`) against its plain path.

Full width (256-d, 8 heads, MLP 2048, 64×64 embedding) with few prompts; weights scaled so the
mask logits are of order 1 and the attention is not uniform, so a tolerance relative to the
logits' scale means something.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import PromptEncoder

from ovsam_model.modeling.decoder import OneTokenMaskDecoder, OVSAMHead


pytestmark = pytest.mark.usefixtures("one_thread")


def _sharpen(head: OVSAMHead) -> OVSAMHead:
    """Default init, then q/k projections ×3 (peaked attention) and the hypernetwork's last
    layer ×20 (logits of order 1 instead of ~0.05)."""
    for m in head.modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            m.q_proj.weight.data.mul_(3.0)
            m.k_proj.weight.data.mul_(3.0)
    last = head.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    last.weight.data.mul_(20.0)
    last.bias.data.mul_(20.0)
    return head


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16).eval()
    head = _sharpen(OVSAMHead()).eval()
    emb = torch.randn(1, 256, 64, 64)
    return prompt, head, emb


def _decode(head: OVSAMHead, fast: bool, *args):
    head.mask_decoder.fast_path = fast
    try:
        return head.mask_decoder.predict(*args, head.label_token.weight)
    finally:
        head.mask_decoder.fast_path = True


def _check(head, emb, pe, sparse, dense):
    with torch.no_grad():
        plain, plain_prefix = _decode(head, False, emb, pe, sparse, dense)
        fast, fast_prefix = _decode(head, True, emb, pe, sparse, dense)
    scale = plain.std().item()
    assert 0.3 < scale < 30, f"logit scale {scale}: the test weights no longer give logits of order 1"
    assert fast.shape == plain.shape == (sparse.shape[0], 1, 256, 256)
    assert fast_prefix.shape == plain_prefix.shape == (sparse.shape[0], 1, 256)
    assert (fast - plain).abs().max().item() <= 1e-5 * scale
    assert (fast_prefix - plain_prefix).abs().max().item() <= 1e-5 * max(plain_prefix.abs().max().item(), 1.0)
    return plain, fast


def test_default_is_fast_and_state_dict_unchanged():
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    head = OVSAMHead()
    assert head.mask_decoder.fast_path is True
    sam = MaskDecoder(transformer_dim=256, num_multimask_outputs=0,
                      transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    expected = [k for k in sam.state_dict() if not k.startswith(("iou_token.", "iou_prediction_head."))]
    assert list(head.mask_decoder.state_dict()) == expected


def test_clicks_fast_equals_plain(setup, monkeypatch):
    """3 click prompts (positive/negative) in chunks of 2: the second chunk is partial."""
    prompt, head, emb = setup
    monkeypatch.setattr(head.mask_decoder, "fast_chunk_cpu", 2)
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(3, 2, 2, generator=g) * 1024
    labels = torch.tensor([[1, -1], [1, 0], [0, 1]])
    with torch.no_grad():
        sparse, dense = prompt(points=(pts, labels), boxes=None, masks=None)
    assert dense.stride(0) == 0 and OneTokenMaskDecoder._dense_shared(dense)
    plain, fast = _check(head, emb, prompt.get_dense_pe(), sparse, dense)
    # the prompts give different masks (a bug mixing prompts up would show)
    assert (plain[0] - plain[2]).abs().max() > 0.1 * plain.std()


def test_boxes_fast_equals_plain_and_materialised_dense(setup):
    """Box prompts; the same "no mask" dense map materialised (as a dtype cast does) is still
    recognised as shared, by value."""
    prompt, head, emb = setup
    boxes = torch.tensor([[10.0, 20.0, 400.0, 380.0], [500.0, 100.0, 900.0, 1000.0]])
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=boxes, masks=None)
        plain, _ = _check(head, emb, prompt.get_dense_pe(), sparse, dense)
        copy = dense.contiguous()
        assert copy.stride(0) != 0 and OneTokenMaskDecoder._dense_shared(copy)
        fast, _ = _decode(head, True, emb, prompt.get_dense_pe(), sparse, copy)
    assert (fast - plain).abs().max().item() <= 1e-5 * plain.std().item()


def test_mask_prompts_fast_equals_plain(setup):
    """Mask prompts: a different dense map per prompt (the non-shared path)."""
    prompt, head, emb = setup
    g = torch.Generator().manual_seed(4)
    masks = torch.randn(2, 1, 256, 256, generator=g) * 5
    with torch.no_grad():
        sparse, dense = prompt(points=(torch.tensor([[[300.0, 400.0]], [[700.0, 200.0]]]), torch.ones(2, 1)),
                               boxes=None, masks=masks)
    assert not OneTokenMaskDecoder._dense_shared(dense)
    _check(head, emb, prompt.get_dense_pe(), sparse, dense)


@pytest.mark.parametrize("train_head", [True, False], ids=["head-trained", "head-frozen"])
def test_gradients_fast_equal_plain(setup, monkeypatch, train_head):
    """Fine-tuning trains the decoder through the fast path: same gradients as the plain path.
    With the head trained, all prompts go in one chunk; with it frozen (gradients to the
    prompts only) in chunks of 1, whose gradients add up."""
    prompt, head, emb = setup
    monkeypatch.setattr(head.mask_decoder, "fast_chunk_cpu", 1)
    head.requires_grad_(train_head)
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0],
                                                                [50.0, 50.0, 300.0, 200.0]]), masks=None)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 1, 256, 256, generator=g)
    pweight = torch.randn(2, 1, 256, generator=g)
    sparse = sparse.clone().requires_grad_(True)
    grads = {}
    for fast in (False, True):
        head.zero_grad(set_to_none=True)
        sparse.grad = None
        masks, prefix = _decode(head, fast, emb, prompt.get_dense_pe(), sparse, dense)
        ((masks * weight).sum() + (prefix * pweight).sum()).backward()
        grads[fast] = {name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None}
        grads[fast]["<sparse>"] = sparse.grad.clone()
    head.zero_grad(set_to_none=True)
    head.requires_grad_(True)
    assert grads[True].keys() == grads[False].keys()
    if train_head:
        assert len(grads[False]) > 40  # every decoder parameter and the label token got a gradient
    else:
        assert list(grads[False]) == ["<sparse>"]
    # k_proj biases whose attention softmax cancels them have a zero gradient in exact arithmetic:
    # rounding noise there is judged against the largest gradient of all
    largest = max(g.abs().max().item() for g in grads[False].values())
    for name, ref in grads[False].items():
        tol = 1e-4 * ref.abs().max().item() + 1e-7 * largest
        err = (grads[True][name] - ref).abs().max().item()
        assert err <= tol, name


def test_bf16_autocast_close(setup):
    """Under bf16 autocast the fast path stays close to the fp32 result (measured: max error
    0.08 × the logits' std, as the plain path's under autocast; mean 0.01 ×)."""
    prompt, head, emb = setup
    with torch.no_grad():
        sparse, dense = prompt(points=(torch.tensor([[[300.0, 400.0]]]), torch.ones(1, 1)), boxes=None, masks=None)
        pe = prompt.get_dense_pe()
        ref, _ = _decode(head, False, emb, pe, sparse, dense)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, _ = _decode(head, True, emb, pe, sparse, dense)
    scale = ref.std().item()
    err = (fast.float() - ref).abs()
    assert err.max().item() <= 0.2 * scale and err.mean().item() <= 0.03 * scale, (err.max(), err.mean(), scale)


def test_a_prompts_logits_do_not_depend_on_the_prompts_decoded_with_it(setup):
    """The engine promises the same bytes for any --box-batch: on CPU every chunk has the same
    shape (a short last chunk is padded), so each prompt's logits are bit-equal whatever else is
    in the call."""
    prompt, head, emb = setup
    torch.manual_seed(1)
    boxes = torch.rand(11, 4) * 512
    boxes[:, 2:] += boxes[:, :2]
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=boxes, masks=None)
        pe = prompt.get_dense_pe()
        all_masks, all_prefix = _decode(head, True, emb, pe, sparse, dense)
        for lo, hi in ((0, 1), (0, 3), (2, 7), (5, 11)):
            masks, prefix = _decode(head, True, emb, pe, sparse[lo:hi], dense[lo:hi])
            assert torch.equal(masks, all_masks[lo:hi]), (lo, hi)
            assert torch.equal(prefix, all_prefix[lo:hi]), (lo, hi)


def _count_transformer_calls(head: OVSAMHead, monkeypatch) -> list[int]:
    calls: list[int] = []
    inner = head.mask_decoder._transformer_fast

    def counted(keys, keys_pos, pos, tokens):
        calls.append(tokens.shape[0])
        return inner(keys, keys_pos, pos, tokens)

    monkeypatch.setattr(head.mask_decoder, "_transformer_fast", counted)
    return calls


def test_training_decodes_all_prompts_in_one_chunk(setup, monkeypatch):
    """Under autograd with the head trained, CPU chunking would keep every chunk's intermediates
    anyway and only add operations: one chunk. Without gradients, chunks of `fast_chunk_cpu`."""
    prompt, head, emb = setup
    monkeypatch.setattr(head.mask_decoder, "fast_chunk_cpu", 2)
    calls = _count_transformer_calls(head, monkeypatch)
    with torch.no_grad():
        sparse, dense = prompt(points=(torch.rand(5, 1, 2) * 1024, torch.ones(5, 1)), boxes=None, masks=None)
        pe = prompt.get_dense_pe()
        head.mask_decoder.predict(emb, pe, sparse, dense, head.label_token.weight)
    assert calls == [2, 2, 2]
    calls.clear()
    head.mask_decoder.predict(emb, pe, sparse, dense, head.label_token.weight)
    assert calls == [5]


@pytest.mark.parametrize("chunk", [2, None])
def test_prompts_on_several_images_equal_one_call_per_image(setup, monkeypatch, chunk):
    """Training decodes the prompts of a whole batch in one call, each prompt with its own
    image's embedding ([N, C, h, w]): the same logits as one call per image, fast and plain."""
    prompt, head, _ = setup
    monkeypatch.setattr(head.mask_decoder, "fast_chunk_cpu", chunk)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 256, 64, 64, generator=g)
    boxes = torch.tensor([[10.0, 20.0, 400.0, 380.0], [500.0, 100.0, 900.0, 1000.0], [0.0, 0.0, 200.0, 900.0],
                          [300.0, 300.0, 700.0, 600.0], [50.0, 600.0, 1000.0, 1020.0]])
    owner = torch.tensor([0, 0, 0, 1, 1])
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=boxes, masks=None)
        pe = prompt.get_dense_pe()
        per_image = [_decode(head, True, images[i : i + 1], pe, sparse[owner == i], dense[owner == i]) for i in (0, 1)]
        ref = torch.cat([m for m, _ in per_image])
        ref_prefix = torch.cat([p for _, p in per_image])
        for fast in (True, False):
            masks, prefix = _decode(head, fast, images[owner], pe, sparse, dense)
            # fp32 rounding of another summation order (batched and plain): 1.0e-5 of the std on an
            # Intel Xeon (AVX512), so the bound is the fp32 tolerance, 1e-4
            scale = ref.std().item()
            assert (masks - ref).abs().max().item() <= 1e-4 * scale, fast
            assert (prefix - ref_prefix).abs().max().item() <= 1e-4 * max(ref_prefix.abs().max().item(), 1.0)
    # the two images give different masks for the same box (a bug using one image would show)
    with torch.no_grad():
        other, _ = _decode(head, True, images[1:2], pe, sparse[:1], dense[:1])
    assert (other - ref[:1]).abs().max() > 0.1 * ref.std()
