"""Our prompt encoder + one-token decoder reproduce segment-anything's `MaskDecoder(num_multimask_outputs=0)`
(one mask token; its IoU token in our label token's place), on both decoder paths (`fast_path`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ovsam_model.config import TINY
from ovsam_model.modeling.decoder import OVSAMHead, one_token_state_from_sam
from ovsam_model.modeling.sam2clip import SAM2CLIPAdapter
from ovsam_model.modeling.clip_trunk import ClipTrunk
from ovsam_model.transforms import boxes_to_model, coords_to_model, prepare_image


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_embeddings(data_dir):
    """256×64×64 embeddings of two real COCO images (random-weight trunk + adapter)."""
    torch.manual_seed(0)
    trunk = ClipTrunk(TINY.clip)
    adapter = SAM2CLIPAdapter(TINY.clip.channels, embed_dim=64, depth=2, num_heads=2, global_blocks=(1,),
                              out_chans=256).eval()
    images = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:2]
    prepared = [prepare_image(np.array(Image.open(p).convert("RGB"))) for p in images]
    with torch.no_grad():
        emb = adapter(trunk(torch.stack([p.pixels for p in prepared])))
    return emb, prepared


@pytest.fixture(scope="module")
def sam_and_ours():
    """segment-anything's `MaskDecoder(num_multimask_outputs=0)` and our head with its weights.

    Default init, then the attention's q/k projections ×3 (peaked, not near-uniform, attention)
    and the hypernetwork's last layer ×20, so the mask logits are of order 1 (as a trained
    decoder's are: ~±10) and a tolerance relative to them is meaningful."""
    torch.manual_seed(1)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16).eval()
    sam_decoder = MaskDecoder(transformer_dim=256, num_multimask_outputs=0,
                              transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    for m in sam_decoder.modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            m.q_proj.weight.data.mul_(3.0)
            m.k_proj.weight.data.mul_(3.0)
    for p in sam_decoder.output_hypernetworks_mlps[0].layers[-1].parameters():
        p.data.mul_(20.0)
    for p in sam_decoder.parameters():  # non-trivial biases, tokens and norms as well
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.02)
    sam_decoder.eval()
    head = OVSAMHead().eval()
    sd = sam_decoder.state_dict()
    head.mask_decoder.load_state_dict(one_token_state_from_sam(sd), strict=True)
    # SAM's IoU token sits where our label token sits: the first output token.
    head.label_token.weight.data.copy_(sd["iou_token.weight"])
    return prompt, sam_decoder, head


def _compare(prompt, sam_decoder, head, embedding, points=None, boxes=None):
    with torch.no_grad():
        sparse, dense = prompt(points=points, boxes=boxes, masks=None)
        pe = prompt.get_dense_pe()
        ref, _ = sam_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=False)
        outs = {}
        for fast in (True, False):  # both decoder paths
            head.mask_decoder.fast_path = fast
            outs[fast], _ = head.decode(embedding, pe, sparse, dense)
        head.mask_decoder.fast_path = True
    scale = ref.std().item()
    assert 0.3 < scale < 30, f"logit scale {scale}: the comparison would not be at a realistic scale"
    for fast, ours in outs.items():
        assert ours.shape == ref.shape == (sparse.shape[0], 1, 256, 256)
        # a sign error or a mixed-up token would differ by O(scale); rounding is ~1e-7 of it
        torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0, msg=lambda m: f"fast_path={fast}: {m}")
    return outs[True]


def test_boxes_match_sam(real_embeddings, sam_and_ours):
    emb, prepared = real_embeddings
    prompt, sam_decoder, head = sam_and_ours
    for i, p in enumerate(prepared):
        boxes = boxes_to_model(torch.tensor([[10.0, 20.0, 200.0, 180.0], [100.0, 100.0, 101.0, 102.0]]),
                               p.original_size, p.input_size)
        out = _compare(prompt, sam_decoder, head, emb[i : i + 1], boxes=boxes)
        assert out.std() > 0  # the comparison is not between constants


def test_positive_and_negative_points_match_sam(real_embeddings, sam_and_ours):
    emb, prepared = real_embeddings
    prompt, sam_decoder, head = sam_and_ours
    p = prepared[0]
    pts = coords_to_model(torch.tensor([[[120.0, 90.0], [300.0, 200.0]], [[50.0, 60.0], [10.0, 10.0]]]),
                          p.original_size, p.input_size)
    labels = torch.tensor([[1, 0], [1, 1]])
    _compare(prompt, sam_decoder, head, emb[:1], points=(pts, labels))


def test_points_with_box_match_sam(real_embeddings, sam_and_ours):
    emb, prepared = real_embeddings
    prompt, sam_decoder, head = sam_and_ours
    pts = torch.tensor([[[400.0, 300.0]]])
    _compare(prompt, sam_decoder, head, emb[1:2], points=(pts, torch.tensor([[0]])),
             boxes=torch.tensor([[300.0, 200.0, 600.0, 500.0]]))


def test_label_token_changes_masks(real_embeddings, sam_and_ours):
    """The label token takes part in attention: a different token gives different masks."""
    emb, _ = real_embeddings
    prompt, _, head = sam_and_ours
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=torch.tensor([[10.0, 10.0, 500.0, 500.0]]), masks=None)
        a, _ = head.decode(emb[:1], prompt.get_dense_pe(), sparse, dense)
        saved = head.label_token.weight.data.clone()
        head.label_token.weight.data.normal_()
        b, _ = head.decode(emb[:1], prompt.get_dense_pe(), sparse, dense)
        head.label_token.weight.data.copy_(saved)
    assert not torch.allclose(a, b)
