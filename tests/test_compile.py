"""`--compile` (`ModelSettings.compile`, `build_predictor(compile=True)`): torch.compile of the CLIP
trunk and the SAM2CLIP adapter only, CUDA only; compiled labels agree with the eager ones."""

from __future__ import annotations

import pytest
import torch
from conftest import agreement

import ovsam_model.builder as builder
from ovsam_model.builder import build_model, build_predictor
from ovsam_model.labeling.api import ModelSettings, load_predictor
from ovsam_model.modeling.compiled import compile_image_side


def test_compile_wraps_exactly_the_trunk_and_the_adapter(monkeypatch):
    compiled = []

    def record(fn, *args, **kwargs):  # what nn.Module.compile hands to torch.compile: the module's call
        compiled.append(fn.__self__)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    model = build_model("tiny-256", random_weights=True)
    keys = list(model.state_dict())
    assert compile_image_side(model) == ["trunk", "adapter"]
    assert len(compiled) == 2 and compiled[0] is model.trunk and compiled[1] is model.adapter
    assert list(model.state_dict()) == keys  # in place: names and checkpoint keys unchanged


def test_compile_needs_cuda_and_an_ovsam_model(tmp_path):
    with pytest.raises(ValueError, match="^--compile needs a CUDA device"):
        build_predictor("tiny", random_weights=True, device="cpu", compile=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is a baseline"):
        build_predictor("baseline-feature-crop:tiny", random_weights=True, device="cpu", compile=True,
                        cache_dir=tmp_path)


def test_model_settings_pass_compile_and_fingerprint_it_only_when_on(monkeypatch):
    seen = []
    monkeypatch.setattr(builder, "build_predictor", lambda name, **kw: seen.append(kw["compile"]))
    load_predictor(ModelSettings(model="tiny", device="cpu"))
    load_predictor(ModelSettings(model="tiny", device="cpu", compile=True))
    assert seen == [False, True]
    assert "--compile" not in ModelSettings(model="tiny", device="cpu").options()  # old fingerprints unchanged
    assert ModelSettings(model="tiny", device="cpu", compile=True).options()["--compile"] is True


@pytest.mark.gpu
def test_compiled_labels_equal_eager_labels(mini_gt_boxes):
    """Real images and GT boxes on the tiny model (fp32): masks IoU ≥ 0.99 and the same top-1 label
    on ≥ 99 % of prompts (the fast paths' criterion)."""
    images, prompts = mini_gt_boxes
    eager = build_predictor("tiny-256", random_weights=True, device="cuda", amp=False).predict(images, prompts)
    fast = build_predictor("tiny-256", random_weights=True, device="cuda", amp=False, compile=True)
    assert fast.model.trunk._compiled_call_impl is not None and fast.model.adapter._compiled_call_impl is not None
    compiled = fast.predict(images, prompts)
    ious, same = agreement(compiled, eager)
    assert any(e.masks.any() for e in eager)
    assert ious.min().item() >= 0.99
    assert same.float().mean().item() >= 0.99
