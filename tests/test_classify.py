"""Classifier: background, synonym max, geometric ensemble, top-k, loss; real CLIP text embeddings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ovsam_model import vocab as V
from ovsam_model.classify import add_background, class_logits, classification_loss, ensemble_probs, top_k

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
EMB = DATA / "clip-text-embeddings"
needs_data = pytest.mark.skipif(not EMB.is_dir(), reason=f"real test data not found at {DATA}")


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- real CLIP text embeddings


@needs_data
@pytest.mark.parametrize("npy, k", [("coco_clip_a+cname.npy", 80), ("lvis_v1_clip_a+cname.npy", 1203)])
def test_real_embeddings_classify_their_own_rows(npy: str, k: int) -> None:
    raw = np.load(EMB / npy)  # fp16, one row per category in id order, not normalised
    vocab = V.load_vocabulary(EMB / npy)
    assert len(vocab) == k
    classes = add_background(V.text_embeddings(vocab, None))
    region = torch.from_numpy(raw.astype(np.float32)) * 7.0  # scale must not matter
    logits = class_logits(region, classes)
    assert logits.shape == (k, k + 1)
    labels, scores = top_k(ensemble_probs(logits, None, torch.ones(k, dtype=torch.bool)), 1)
    assert labels[:, 0].tolist() == list(range(k))
    assert (scores[:, 0] > 0.5).all()
    # 100 × cosine, against numpy in float64
    r = raw.astype(np.float64)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_allclose(logits[:, :k].numpy(), 100 * r @ r.T, atol=2e-3)
    assert torch.equal(logits[:, k], torch.zeros(k))
    # dataset category ids and names of the predictions
    ids = [vocab.category_ids[i] for i in labels[:, 0].tolist()]
    if k == 80:
        cats = json.loads((DATA / "coco-val2017-mini" / "instances.json").read_text())["categories"]
    else:
        cats = json.loads((EMB / "lvis_v1_train_cat_info.json").read_text())
    assert ids == [c["id"] for c in cats]
    assert [vocab.class_names[i] for i in labels[:, 0].tolist()] == [c["name"] for c in cats]


# ---------------------------------------------------------------- logits


def test_add_background() -> None:
    e = torch.randn(3, 2, 4)
    b = add_background(e)
    assert b.shape == (4, 2, 4) and torch.equal(b[:3], e) and torch.equal(b[3], torch.zeros(2, 4))
    with pytest.raises(ValueError):
        add_background(torch.randn(3, 4))


def test_class_logits_max_over_synonyms_by_hand() -> None:
    s = 1 / math.sqrt(2)
    classes = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # class 0: two synonyms
            [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],  # class 1: padded
            [[s, s, 0.0], [s, 0.0, s]],  # class 2
        ]
    )
    region = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    logits = class_logits(region, add_background(classes), logit_scale=50.0)
    # region 0 normalised = (0.6, 0.8, 0)
    exp0 = [50 * max(0.6, 0.8), 50 * 0.0, 50 * max(s * 1.4, s * 0.6), 0.0]
    exp1 = [50 * 0.0, 50 * -1.0, 50 * max(0.0, -s), 0.0]
    torch.testing.assert_close(logits, torch.tensor([exp0, exp1]))
    with pytest.raises(ValueError):
        class_logits(torch.randn(2, 4), classes)


# ---------------------------------------------------------------- ensemble


def test_ensemble_formula_by_hand() -> None:
    head = [[2.0, 0.5, -1.0, 0.0], [0.1, 3.0, 1.0, 2.0]]
    clip = [[-1.0, 1.5, 2.5, 0.0], [1.0, 0.0, -0.5, 0.3]]
    seen = [True, False, True]
    alpha, beta = 0.25, 0.8
    probs = ensemble_probs(
        torch.tensor(head), torch.tensor(clip), torch.tensor(seen), alpha=alpha, beta=beta,
        use_clip=torch.tensor([True, False]),
    )
    expected = []
    for n in range(2):
        ph, pc = softmax(head[n]), softmax(clip[n])
        row = []
        for c in range(3):
            w = alpha if seen[c] else beta
            row.append(ph[c] ** (1 - w) * pc[c] ** w if n == 0 else ph[c])
        expected.append(row)
    torch.testing.assert_close(probs, torch.tensor(expected), atol=1e-6, rtol=1e-5)
    # no CLIP logits → the head alone, background column dropped
    torch.testing.assert_close(
        ensemble_probs(torch.tensor(head), None, torch.tensor(seen)),
        torch.tensor([softmax(h)[:3] for h in head]),
    )


def test_ensemble_default_weights_and_stability() -> None:
    head = torch.tensor([[300.0, -300.0, 0.0]])
    clip = torch.tensor([[-300.0, 300.0, 0.0]])
    p = ensemble_probs(head, clip, torch.tensor([True, False]))  # α = 0.1 seen, β = 0.9 unseen
    assert torch.isfinite(p).all()
    # log p0 = 0.9·0 + 0.1·(-600) ; log p1 = 0.1·(-600) + 0.9·0 (softmax logs, exact up to e^-300)
    torch.testing.assert_close(p.log(), torch.tensor([[-60.0, -60.0]]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        ensemble_probs(head, clip, torch.tensor([True]))


def test_top_k() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.3], [0.6, 0.2, 0.05]])
    labels, scores = top_k(probs, 2)
    assert labels.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[0.5, 0.3], [0.6, 0.2]]))
    labels, _ = top_k(probs, 10)  # clipped to K
    assert labels.shape == (2, 3)


def test_background_never_wins_argmax() -> None:
    # every foreground cosine negative: background logit 0 is the largest, yet labels are foreground
    # orthonormal classes and a region pointing away from all of them (deterministic)
    classes = add_background(torch.eye(8)[:5, None, :])
    region = -(classes[:5, 0] * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]).sum(0, keepdim=True)
    logits = class_logits(region, classes)
    assert logits.argmax(-1).item() == 5
    labels, _ = top_k(ensemble_probs(logits, None, torch.zeros(5, dtype=torch.bool)), 1)
    assert 0 <= labels.item() < 5 and labels.item() == logits[0, :5].argmax().item()


# ---------------------------------------------------------------- loss


def test_classification_loss_by_hand() -> None:
    logits = [[2.0, 0.0, 1.0], [0.5, 1.5, -1.0], [0.0, 0.0, 3.0]]
    targets = [0, 2, 2]  # K = 2 is background
    bg = 0.1
    per = [-math.log(softmax(l)[t]) * (bg if t == 2 else 1.0) for l, t in zip(logits, targets)]
    loss = classification_loss(torch.tensor(logits), torch.tensor(targets), bg_weight=bg)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-6)
    x = torch.tensor(logits, requires_grad=True)
    classification_loss(x, torch.tensor(targets)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert classification_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0
