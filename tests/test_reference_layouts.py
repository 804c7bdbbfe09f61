"""Our full-size modules have exactly the tensors of the reference layouts: open_clip's RN50x16
and ConvNeXt-L-320 (the frozen trunk), and the whole official OVSAM test model."""

from __future__ import annotations

import json
import re

import pytest

from ovsam_model.config import CONVNEXT_L
from ovsam_model.modeling.clip_trunk import ClipTrunk


def _keys(keys_dir, name) -> dict:
    return json.loads((keys_dir / name).read_text())["keys"]


def _shapes(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_rn50x16_trunk_is_open_clips_rn50x16(random_ovsam, keys_dir):
    assert _shapes(random_ovsam.trunk.clip) == _keys(keys_dir, "ref_open_clip_RN50x16.json")


@pytest.mark.slow
def test_convnext_trunk_is_open_clips_convnext_large_d_320(keys_dir):
    trunk = ClipTrunk(CONVNEXT_L.clip, pretrained=None)
    assert _shapes(trunk.clip) == _keys(keys_dir, "ref_open_clip_convnext_large_d_320.json")
    stages = [s.blocks[-1].mlp.fc2.out_features for s in trunk.clip.visual.trunk.stages]
    assert tuple(stages) == CONVNEXT_L.clip.channels


def test_whole_model_matches_the_official_test_model(random_ovsam, keys_dir):
    """Every tensor of the official OVSAM model (backbone, neck, pe, mask_decoder, fpn_neck) has
    its counterpart, same shape, in ours; the CLIP text tower is ours only (the official model
    loads precomputed text embeddings instead)."""
    ref = json.loads((keys_dir / "ovsam_full_model_reference.json").read_text())
    rules = ref["backbone_to_open_clip_rules"]

    def ours(key: str) -> str:
        top, rest = key.split(".", 1)
        if top == "backbone":
            for src, dst in rules.items():
                if rest == src or rest.startswith(src + "."):
                    return "trunk.clip." + dst + rest[len(src):]
            raise AssertionError(f"no backbone rule for {key}")
        if top == "fpn_neck":
            return "fpn." + random_ovsam.fpn.official_key_map(rest)
        return {"neck": "adapter.", "pe": "prompt_encoder.", "mask_decoder": "head."}[top] + rest

    mine = _shapes(random_ovsam)
    mapped = {ours(k): shape for k, shape in ref["keys"].items()}
    assert {k: mine.get(k) for k in mapped} == mapped
    extra = {k for k in mine if k not in mapped}
    assert extra and all(re.match(r"trunk\.clip\.(?!visual\.)", k) for k in extra)  # the text tower only
