"""`--cpu-bf16` (`ModelSettings.cpu_bf16`, `build_predictor(cpu_bf16=True)`): OVSAM under bf16
autocast on CPU, as on CUDA. Issue 8's bf16 criterion against the float32 path: masks IoU ≥ 0.98."""

from __future__ import annotations

import pytest
import torch
from conftest import agreement

import ovsam_model.runtime as runtime
from ovsam_model.builder import build_predictor
from ovsam_model.labeling.api import ModelSettings
from ovsam_model.runtime import autocast_context


def test_cpu_bf16_runs_the_model_in_bf16_and_agrees_with_float32(mini_gt_boxes):
    images, prompts = mini_gt_boxes
    predictor = build_predictor("tiny-256", random_weights=True, device="cpu")
    assert predictor.cpu_bf16 is False
    dtypes = []
    predictor.model.trunk.register_forward_hook(lambda mod, inp, out: dtypes.append(out[-1].dtype))
    fp32 = predictor.predict(images, prompts)
    predictor.cpu_bf16 = True
    bf16 = predictor.predict(images, prompts)
    assert dtypes == [torch.float32, torch.bfloat16]  # the flag reaches the model: C5 in bf16
    assert any(p.masks.any() for p in fp32)  # not a comparison of empty masks
    ious, same = agreement(bf16, fp32)
    assert ious.mean().item() >= 0.98, ious
    assert same.float().mean().item() >= 0.99
    assert any(not torch.equal(b.masks, f.masks) or not torch.equal(b.topk_scores, f.topk_scores)
               for b, f in zip(bf16, fp32))  # bf16 really ran: some output differs from float32


def test_cpu_bf16_is_for_ovsam_models(tmp_path):
    with pytest.raises(ValueError, match="^--cpu-bf16 applies to OVSAM models"):
        build_predictor("baseline-image-crop:tiny", random_weights=True, device="cpu", cpu_bf16=True,
                        cache_dir=tmp_path)


def test_autocast_context_per_device():
    assert isinstance(autocast_context("cpu", True), type(autocast_context("cpu", False)))  # amp alone: CUDA only
    with autocast_context("cpu", amp=False, cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context("cpu", amp=True, cpu_bf16=False):
        assert not torch.is_autocast_enabled("cpu")


def test_settings_fingerprint_and_warning(monkeypatch):
    plain, fast = ModelSettings(model="tiny", device="cpu"), ModelSettings(model="tiny", device="cpu", cpu_bf16=True)
    assert "--cpu-bf16" not in plain.options()  # fingerprints of earlier runs unchanged
    assert fast.options()["--cpu-bf16"] is True  # a resume cannot mix bf16 and float32 records
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert fast.warnings() == ["this CPU has no native bf16 (AVX512-BF16 or AMX): --cpu-bf16 will run slower "
                               "than float32"]
    assert plain.warnings() == []
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert fast.warnings() == []


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    def cpuinfo(flags_line: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\n{flags_line}\n\nprocessor\t: 1\n{flags_line}\n")
        return path

    assert runtime.cpu_has_native_bf16(cpuinfo("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni"))
    assert runtime.cpu_has_native_bf16(cpuinfo("flags\t\t: fpu avx512f amx_bf16 amx_tile"))
    assert runtime.cpu_has_native_bf16(cpuinfo("Features\t: fp asimd sve bf16 i8mm"))  # Arm (e.g. Graviton3)
    # AVX-512 without its BF16 extension: oneDNN runs bf16, but emulated (slower than float32)
    assert not runtime.cpu_has_native_bf16(cpuinfo("flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512dq"))
    assert not runtime.cpu_has_native_bf16(cpuinfo("Features\t: fp asimd"))
