"""Prompts check their inputs: a malformed prompt is an error, not a silently different prompt."""

from __future__ import annotations

import numpy as np
import pytest

from ovsam_model.types import Prompts


def test_prompts_accept_boxes_points_and_both():
    p = Prompts(boxes=[[0, 0, 10, 10], [5, 5, 6, 9]])
    assert len(p) == 2 and p.boxes.shape == (2, 4)
    q = Prompts(points=[[1, 2], [3, 4]], point_labels=[1, 0])  # one click per prompt
    assert q.points.shape == (2, 1, 2) and q.point_labels.tolist() == [[1], [0]]
    r = Prompts(boxes=[[0, 0, 4, 4]], points=[[[1, 1], [2, 2]]], point_labels=[[1, -1]])
    assert len(r) == 1 and len(r.slice(0, 1)) == 1
    assert len(Prompts(boxes=np.zeros((0, 4)))) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boxes": [[0, 0, 10, 10, 0.9]]}, r"\[N, 4\]"),  # a score column is not a fifth coordinate
        ({"boxes": [[10, 0, 5, 10]]}, "not XYXY"),
        ({"boxes": [[0, 0, np.nan, 10]]}, "NaN"),
        ({"points": [[1, 2]], "point_labels": [5]}, "point labels"),
        ({"points": [[1, 2]]}, "point_labels"),
        ({"points": [[np.inf, 2]], "point_labels": [1]}, "NaN"),
        ({"boxes": [[0, 0, 1, 1]], "points": [[1, 1], [2, 2]], "point_labels": [1, 1]}, "1 boxes but 2"),
    ],
)
def test_malformed_prompts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Prompts(**kwargs)


def test_prediction_length_comes_from_the_labels_in_both_mask_formats():
    import torch

    from ovsam_model.types import Prediction

    labels = torch.tensor([3, 1])
    rle = Prediction(masks=None, labels=labels, scores=torch.ones(2), topk_labels=labels[:, None],
                     topk_scores=torch.ones(2, 1), rles=[{"size": [4, 5], "counts": "T1"}] * 2)
    assert len(rle) == 2
    empty_bool, empty_rle = Prediction.empty(4, 5, k=3), Prediction.empty(4, 5, k=3, mask_format="rle")
    assert empty_bool.masks.shape == (0, 4, 5) and empty_bool.rles is None
    assert empty_rle.masks is None and empty_rle.rles == [] and empty_rle.topk_labels.shape == (0, 3)
    assert len(empty_bool) == len(empty_rle) == 0
