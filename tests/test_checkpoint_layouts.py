"""Strict loading of synthetic checkpoints written with the exact official layouts
(shared/data/ovsam-keys) into the real modules, and rejection of renamed / reshaped tensors."""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from ovsam_model import registry
from ovsam_model.checkpoint import (
    CheckpointError,
    load_payload,
    load_spec_weights,
    load_weight_file,
    read_checkpoint,
    synthetic_payload,
    write_synthetic_checkpoint,
)

# layout JSON → the registry's WeightFile for that released file
OVSAM_FILES = {
    "sam2clip_vith_rn50x16.json": registry.SAM2CLIP,
    "clip2sam_coco_rn50x16.json": registry.CLIP2SAM_COCO,
    "clip2sam_lvis_rn50x16.json": registry.CLIP2SAM_LVIS,
    "ovsam_R50x16_lvisnorare.json": registry.DEMO_HEAD,
    "R50x16_fpn_lvis_norare_v3det.json": registry.DEMO_FPN,
    "RN50x16_LVISV1Dataset.json": registry.DEMO_TEXT,
}


@lru_cache(maxsize=None)
def _layout(path: str) -> dict:
    return json.loads(Path(path).read_text())


def layout(keys_dir: Path, name: str) -> dict:
    return _layout(str(keys_dir / name))


def module_tensor(model: nn.Module, wf: registry.WeightFile, official_key: str) -> torch.Tensor:
    """The model tensor that `official_key` of `wf` must have been loaded into."""
    for prefix, attr in wf.targets:
        if official_key.startswith(prefix):
            module = model.get_submodule(attr)
            local = official_key[len(prefix):]
            if hasattr(module, "official_key_map"):
                local = module.official_key_map(local)
            return module.state_dict()[local]
    raise AssertionError(f"no target for {official_key}")


def assert_loaded(model: nn.Module, wf: registry.WeightFile, payload: dict) -> None:
    for key, value in payload.items():
        assert torch.equal(module_tensor(model, wf, key), value), key


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "state_dict-wrapped"])
@pytest.mark.parametrize("json_name", list(OVSAM_FILES))
def test_official_layout_loads_strictly(random_ovsam, keys_dir, tmp_path, json_name, wrap):
    wf = OVSAM_FILES[json_name]
    path = write_synthetic_checkpoint(keys_dir / json_name, tmp_path / wf.filename, wrap_state_dict=wrap, seed=3)
    payload = read_checkpoint(path)
    extra = load_weight_file(random_ovsam, wf, path)
    if wf.is_tensor:
        assert list(extra) == ["text_embeddings"]
        assert extra["text_embeddings"].shape == (1203, 2, 768)
        assert torch.equal(extra["text_embeddings"], payload)
    else:
        assert extra == {}
        assert set(payload) == set(layout(keys_dir, json_name)["keys"])
        assert_loaded(random_ovsam, wf, payload)


def _first_multi_dim_key(state: dict) -> str:
    return next(k for k, v in state.items() if v.dim() >= 2 and v.shape[-1] > 1)


@pytest.mark.parametrize("json_name", [n for n, wf in OVSAM_FILES.items() if not wf.is_tensor])
def test_renamed_and_reshaped_tensors_are_rejected(random_ovsam, keys_dir, json_name):
    wf = OVSAM_FILES[json_name]
    good = synthetic_payload(layout(keys_dir, json_name), seed=1)

    victim = list(good)[-1]
    renamed = dict(good)
    renamed[victim.replace(".weight", ".wieght").replace(".bias", ".bais")] = renamed.pop(victim)
    with pytest.raises(CheckpointError) as err:
        load_payload(random_ovsam, wf, renamed, wf.filename)
    msg = str(err.value)
    assert f"missing key {victim}" in msg and "unexpected key" in msg
    assert msg.startswith(f"{wf.filename} (component {wf.component} → ")

    victim = _first_multi_dim_key(good)
    reshaped = dict(good)
    shape = list(good[victim].shape)
    shape[-1] //= 2
    reshaped[victim] = torch.zeros(shape)
    with pytest.raises(CheckpointError) as err:
        load_payload(random_ovsam, wf, reshaped, wf.filename)
    want = "[" + ", ".join(map(str, good[victim].shape)) + "]"
    assert f"key {victim} has shape [{', '.join(map(str, shape))}], expected {want}" in str(err.value)


def test_messages_use_official_fpn_names(random_ovsam, keys_dir):
    wf = registry.CLIP2SAM_COCO
    state = synthetic_payload(layout(keys_dir, "clip2sam_coco_rn50x16.json"))
    del state["fpn_neck.fpn_convs.3.conv.bias"]
    with pytest.raises(CheckpointError, match=r"clip2sam → fpn\): missing key fpn_neck\.fpn_convs\.3\.conv\.bias$"):
        load_payload(random_ovsam, wf, state, wf.filename)

    state = synthetic_payload(layout(keys_dir, "clip2sam_coco_rn50x16.json"))
    state["mask_decoder.label_mlp.layers.2.weight"] = torch.zeros(768, 128)
    with pytest.raises(CheckpointError) as err:
        load_payload(random_ovsam, wf, state, wf.filename)
    assert str(err.value) == ("clip2sam_coco_rn50x16.pth (component clip2sam → head): key "
                              "mask_decoder.label_mlp.layers.2.weight has shape [768, 128], expected [768, 256]")


def test_key_outside_every_target_is_unexpected(random_ovsam, keys_dir):
    state = synthetic_payload(layout(keys_dir, "ovsam_R50x16_lvisnorare.json"))
    state["fpn_neck.lateral_convs.0.conv.bias"] = torch.zeros(256)
    with pytest.raises(CheckpointError, match=r"unexpected key fpn_neck\.lateral_convs\.0\.conv\.bias"):
        load_payload(random_ovsam, registry.DEMO_HEAD, state, "x.pth")


def test_text_embeddings_shape_and_type_checked(random_ovsam):
    wf = registry.DEMO_TEXT
    with pytest.raises(CheckpointError, match=r"tensor has shape \[1203, 2, 512\], expected \[1203, \*, 768\]"):
        load_payload(random_ovsam, wf, torch.zeros(1203, 2, 512), wf.filename)
    with pytest.raises(CheckpointError, match="expected a bare tensor"):
        load_payload(random_ovsam, wf, {"a": torch.zeros(1)}, wf.filename)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_payload(random_ovsam, registry.DEMO_HEAD, torch.zeros(3), "x.pth")


def test_demo_fpn_roi_conv_overrides_the_heads(random_ovsam, keys_dir, tmp_path):
    spec = registry.get_spec("ovsam-rn50x16-demo")
    paths = {}
    for json_name, component in [("ovsam_R50x16_lvisnorare.json", "head"),
                                 ("R50x16_fpn_lvis_norare_v3det.json", "fpn"),
                                 ("RN50x16_LVISV1Dataset.json", "text_embeddings")]:
        wf = spec.file(component)
        paths[component] = write_synthetic_checkpoint(keys_dir / json_name, tmp_path / wf.filename,
                                                      seed=len(paths) + 10)
    payloads = load_spec_weights(random_ovsam, spec, paths)
    head_file, fpn_file = read_checkpoint(paths["head"]), read_checkpoint(paths["fpn"])
    loaded = random_ovsam.head.roi_conv.state_dict()["0.conv.weight"]
    assert torch.equal(loaded, fpn_file["roi_conv.0.conv.weight"])
    assert not torch.equal(loaded, head_file["mask_decoder.roi_conv.0.conv.weight"])
    # the rest of the head comes from the head file
    assert torch.equal(random_ovsam.head.label_token.weight, head_file["mask_decoder.label_token.weight"])
    assert torch.equal(payloads["text_embeddings"], read_checkpoint(paths["text_embeddings"]))


def test_sam_prompt_encoder_subset_loads(random_ovsam, keys_dir, tmp_path):
    full = layout(keys_dir, "ref_sam_vit_h.json")
    sub = {"keys": {k: v for k, v in full["keys"].items() if k.startswith("prompt_encoder.")}}
    assert len(sub["keys"]) == 17
    lay = tmp_path / "pe.json"
    lay.write_text(json.dumps(sub))
    wf = registry.prompt_encoder_weight("vit_h")
    for wrap in (False, True):
        path = write_synthetic_checkpoint(lay, tmp_path / f"pe{wrap}.pth", wrap_state_dict=wrap, seed=int(wrap))
        load_weight_file(random_ovsam, wf, path)
        assert_loaded(random_ovsam, wf, read_checkpoint(path))


# --- independent of the project's modeling code: segment_anything modules -------------------

class SamParts(nn.Module):
    """segment_anything's prompt encoder and (3-output) mask decoder, as in SAM/MobileSAM."""

    def __init__(self) -> None:
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        self.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(1024, 1024), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                                        transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                      mlp_dim=2048, num_heads=8))


SAM_DECODER = registry.WeightFile(component="sam_decoder", filename="mobile_sam.pt", url="",
                                  targets=(("mask_decoder.", "mask_decoder"),), ignore_other_keys=True)


def test_mobile_sam_file_prompt_encoder_and_decoder(data_dir, tmp_path):
    """A whole MobileSAM checkpoint (439 tensors): only the targets are taken, strictly."""
    path = write_synthetic_checkpoint(data_dir / "mobile_sam_keys.json", tmp_path / "mobile_sam.pt", seed=5)
    parts = SamParts()
    state = read_checkpoint(path)
    assert any(k.startswith("image_encoder.") for k in state)
    pe = registry.prompt_encoder_weight("vit_h")
    load_weight_file(parts, pe, path)
    load_weight_file(parts, SAM_DECODER, path)
    assert_loaded(parts, pe, {k: v for k, v in state.items() if k.startswith("prompt_encoder.")})
    assert_loaded(parts, SAM_DECODER, {k: v for k, v in state.items() if k.startswith("mask_decoder.")})

    # without ignore_other_keys the image encoder is reported
    strict_pe = registry.WeightFile(component="prompt_encoder", filename="mobile_sam.pt", url="",
                                    targets=(("prompt_encoder.", "prompt_encoder"),))
    with pytest.raises(CheckpointError, match=r"unexpected key image_encoder\."):
        load_weight_file(parts, strict_pe, path)


def test_segment_anything_decoder_rejects_one_token_layout(keys_dir):
    """SAM's 4-token decoder is not the OVSAM head: the loader says which key differs."""
    parts = SamParts()
    state = synthetic_payload(layout(keys_dir, "clip2sam_coco_rn50x16.json"))
    dec = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.mask_decoder.")}
    wf = registry.WeightFile(component="d", filename="d.pth", url="", targets=(("mask_decoder.", "mask_decoder"),))
    with pytest.raises(CheckpointError, match=r"missing key mask_decoder\.iou_token\.weight"):
        load_payload(parts, wf, dec, "d.pth")


# --- read_checkpoint -------------------------------------------------------------------------

def test_read_checkpoint_variants(tmp_path):
    from safetensors.torch import save_file

    t = {"a.weight": torch.randn(2, 3), "b": torch.randn(4)}
    od = OrderedDict(t)
    od._metadata = {"": {"version": 1}}  # what mmengine leaves on saved state dicts
    cases = {
        "plain.pth": od,
        "wrapped.pth": {"state_dict": od, "meta": {"epoch": 3}},
        "model.pth": {"model": dict(t)},
        "ddp.pth": {f"module.{k}": v for k, v in t.items()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        got = read_checkpoint(tmp_path / name)
        assert set(got) == set(t), name
        assert all(torch.equal(got[k], t[k]) for k in t), name
    save_file(t, str(tmp_path / "w.safetensors"))
    got = read_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], t[k]) for k in t)

    torch.save(torch.arange(6), tmp_path / "bare.pth")
    assert torch.equal(read_checkpoint(tmp_path / "bare.pth"), torch.arange(6))

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^junk\.pth: cannot read weight file"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"a": torch.zeros(1), "step": 5}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth: entry 'step' is a int"):
        read_checkpoint(tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "absent.pth")
