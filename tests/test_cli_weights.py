"""`ovsam` root options and `ovsam weights list | download | verify`, through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ovsam_cli.weights as cli_weights
from ovsam_cli.main import app
from ovsam_model import __version__, weights
from ovsam_model.checkpoint import write_synthetic_checkpoint
from ovsam_model.registry import MODEL_REGISTRY, get_spec

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    for var in ("OVSAM_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_open_url", lambda url: pytest.fail(f"network used: {url}"))


def test_help_and_version():
    res = runner.invoke(app, [])
    assert "weights" in res.output and "Usage" in res.output
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "--version" in res.output and "weights" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ovsam {__version__}"
    res = runner.invoke(app, ["weights", "--help"])
    assert res.exit_code == 0 and all(c in res.output for c in ("list", "download", "verify"))


def test_weights_list(tmp_path):
    spec = get_spec("ovsam-rn50x16-coco")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "clip2sam_coco_rn50x16.pth").write_bytes(b"0" * spec.file("clip2sam").size)
    (cache / "sam2clip_vith_rn50x16.pth").write_bytes(b"short")
    res = runner.invoke(app, ["weights", "list", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    expected = {(s.name, wf.component) for s in MODEL_REGISTRY.values() for wf in s.files}
    assert {(r["model"], r["component"]) for r in rows if r["component"] != "clip"} == expected
    by = {(r["model"], r["component"]): r for r in rows}
    assert by["ovsam-rn50x16-coco", "clip2sam"]["cached"] == "yes"
    assert by["ovsam-rn50x16-coco", "sam2clip"]["cached"] == "wrong size"
    assert by["ovsam-rn50x16-lvis", "clip2sam"]["cached"] == "no"
    assert by["ovsam-rn50x16-lvis", "clip2sam"]["sha256"] == "no"
    assert by["ovsam-rn50x16-demo", "text_embeddings"]["size"] == 7_392_482

    res = runner.invoke(app, ["weights", "list", "--model", "ovsam-rn50x16-demo", "--format", "tsv"])
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 0 and lines[0].split("\t") == ["model", "component", "file", "size", "cached", "sha256"]
    assert [line.split("\t")[1] for line in lines[1:]] == ["sam2clip", "head", "fpn", "text_embeddings",
                                                            "prompt_encoder", "clip"]
    res = runner.invoke(app, ["weights", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "R50x16_fpn_lvis_norare_v3det.pth" in res.stdout


def test_download_offline_is_one_line(monkeypatch):
    res = runner.invoke(app, ["weights", "download", "ovsam-rn50x16-coco", "--offline"])
    assert res.exit_code != 0
    assert res.stderr.strip().count("\n") == 0 and "offline" in res.stderr
    assert "Traceback" not in res.output
    monkeypatch.setenv("OVSAM_OFFLINE", "1")
    res = runner.invoke(app, ["weights", "download", "ovsam-rn50x16-coco"])
    assert res.exit_code != 0 and "offline" in res.stderr
    # a model of random weights has nothing to fetch: not an offline failure
    res = runner.invoke(app, ["weights", "download", "tiny"])
    assert res.exit_code == 0 and res.stdout == "" and "nothing to download" in res.stderr


@pytest.mark.parametrize("args", [["weights", "download", "no-such-model"],
                                  ["weights", "list", "--model", "no-such-model"],
                                  ["weights", "verify", "--model", "no-such-model", "--weights-dir", "."]])
def test_unknown_model_is_one_line_listing_the_names(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0]
    assert all(name in lines[0] for name in MODEL_REGISTRY)


def test_help_fits_80_columns():
    """Model names are listed whole in the help text (not broken inside a choice metavar)."""
    for args in (["weights", "download", "--help"], ["weights", "verify", "--help"], ["weights", "list", "--help"]):
        res = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert res.exit_code == 0
        assert all(len(line) <= 80 for line in res.output.splitlines())
        assert "ovsam-rn50x16-coco," in res.output and "baseline-feature-crop," in res.output


def test_device_resolution():
    import typer

    from ovsam_cli.common import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", local_rank=1) == "cpu"
    for bad in ("gpu0", "cuda:x", "", "mps", "xpu", "meta"):  # torch parses the last three: refused by us
        with pytest.raises(typer.BadParameter, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda", local_rank=0) == "cuda:0" and resolve_device("cuda") == "cuda"
        with pytest.raises(typer.BadParameter, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(typer.BadParameter, match="no CUDA device") as exc:
            resolve_device("cuda:0", option="--devices")
        assert "--devices" in exc.value.format_message()


def test_download_network_failure_is_one_line(monkeypatch):
    import urllib.error

    def down(url):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(weights, "_open_url", down)
    res = runner.invoke(app, ["weights", "download", "ovsam-rn50x16-coco", "--quiet"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "no route to host" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_download_fetches_everything_and_says_how_to_go_offline(monkeypatch, tmp_path):
    import io

    def serve(url):
        buf = io.BytesIO()
        torch.save({"prompt_encoder.x": torch.zeros(1), "image_encoder.y": torch.zeros(2)}, buf)
        body = buf.getvalue()
        resp = io.BytesIO(body)
        resp.headers = {"Content-Length": str(len(body))}
        return resp

    monkeypatch.setattr(weights, "_open_url", serve)
    monkeypatch.setattr(weights, "download_clip", lambda spec, cache_dir=None: tmp_path / "clip.bin")
    res = runner.invoke(app, ["weights", "download", "baseline-image-crop", "--sam-variant", "vit_b",
                              "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"sam\t{tmp_path / 'c' / 'sam_vit_b_01ec64.pth'}", f"clip\t{tmp_path / 'clip.bin'}"]
    assert "OVSAM_OFFLINE=1" in res.stderr and "--offline" in res.stderr and "--cache-dir" in res.stderr
    assert (tmp_path / "c" / "sam_vit_b_01ec64.pth.sha256").is_file()


def test_checkpoint_option_parsing():
    import typer

    from ovsam_cli.common import parse_checkpoints

    assert parse_checkpoints(["clip2sam=/x/y.pth", " sam2clip = a.pth"], ["clip2sam", "sam2clip"]) == \
        {"clip2sam": Path("/x/y.pth"), "sam2clip": Path("a.pth")}
    for bad, match in ((["clip2sam"], "COMPONENT=PATH"), (["=a"], "COMPONENT=PATH"),
                       (["head=a"], "unknown component 'head'"), (["clip2sam=a", "clip2sam=b"], "twice")):
        with pytest.raises(typer.BadParameter, match=match):
            parse_checkpoints(bad, ["clip2sam", "sam2clip"])


# --- verify ---------------------------------------------------------------------------------

@pytest.fixture
def use_shared_model(monkeypatch, random_ovsam):
    """verify loads into the session's randomly initialised coco model instead of building one."""
    monkeypatch.setattr(cli_weights, "_build_random_model", lambda spec: random_ovsam)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory, keys_dir):
    folder = tmp_path_factory.mktemp("weights")
    write_synthetic_checkpoint(keys_dir / "sam2clip_vith_rn50x16.json", folder / "sam2clip_vith_rn50x16.pth")
    write_synthetic_checkpoint(keys_dir / "clip2sam_coco_rn50x16.json", folder / "clip2sam_coco_rn50x16.pth",
                               wrap_state_dict=True)
    return folder


def test_verify_synthetic_files(use_shared_model, coco_dir):
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-coco", "--weights-dir", str(coco_dir)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "sam2clip"], ["ok", "clip2sam"], ["absent", "prompt_encoder"]]


def test_verify_rejects_a_bad_layout(use_shared_model, keys_dir, tmp_path):
    layout = json.loads((keys_dir / "clip2sam_coco_rn50x16.json").read_text())
    layout["keys"]["fpn_neck.fpn_convs.3.conv.bias"] = [128]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(layout))
    write_synthetic_checkpoint(bad, tmp_path / "clip2sam_coco_rn50x16.pth")
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-coco", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "key fpn_neck.fpn_convs.3.conv.bias has shape [128], expected [256]" in res.stdout
    assert "FAILED" in res.stdout and "absent" in res.stdout
    assert "fpn_neck.fpn_convs.3.conv.bias" in res.stderr and res.stderr.strip().count("\n") == 0


def test_verify_demo_files_and_prompt_encoder(use_shared_model, keys_dir, tmp_path):
    spec = get_spec("ovsam-rn50x16-demo")
    for json_name, component in (("ovsam_R50x16_lvisnorare.json", "head"), ("R50x16_fpn_lvis_norare_v3det.json", "fpn"),
                                 ("RN50x16_LVISV1Dataset.json", "text_embeddings")):
        write_synthetic_checkpoint(keys_dir / json_name, tmp_path / spec.file(component).filename)
    full = json.loads((keys_dir / "ref_sam_vit_h.json").read_text())["keys"]
    pe = {"keys": {k: v for k, v in full.items() if k.startswith("prompt_encoder.")}}
    (tmp_path / "pe.json").write_text(json.dumps(pe))
    write_synthetic_checkpoint(tmp_path / "pe.json", tmp_path / "sam_vit_h_prompt_encoder.pth")
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-demo", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    status = {line.split()[1]: line.split()[0] for line in res.stdout.strip().splitlines()}
    assert status == {"sam2clip": "absent", "head": "ok", "fpn": "ok", "text_embeddings": "ok", "prompt_encoder": "ok"}


def test_verify_empty_dir_and_bad_dir(tmp_path):
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-coco", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 1 and "no weight file of ovsam-rn50x16-coco" in res.stderr
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-coco",
                              "--weights-dir", str(tmp_path / "missing")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["weights", "verify", "--model", "nope", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["weights", "verify", "--model", "tiny", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 2 and "tiny has random weights: there is no weight file to verify" in res.stderr


def test_verify_builds_the_model_itself(keys_dir, tmp_path):
    """The real path: `ovsam_model.builder.build_model(spec, random_weights=True)`."""
    pytest.importorskip("ovsam_model.builder")
    write_synthetic_checkpoint(keys_dir / "clip2sam_lvis_rn50x16.json", tmp_path / "clip2sam_lvis_rn50x16.pth")
    res = runner.invoke(app, ["weights", "verify", "--model", "ovsam-rn50x16-lvis", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1].split()[:3] == ["ok", "clip2sam", "clip2sam_lvis_rn50x16.pth"]


def test_verbosity_maps_to_logging():
    import logging

    for flags, level in (([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG)):
        res = runner.invoke(app, [*flags, "weights", "list", "--format", "tsv", "--model", "tiny"])
        assert res.exit_code == 0, res.output
        assert logging.getLogger().level == level


def test_verify_baseline_sam_vit_b(keys_dir, tmp_path):
    """A whole SAM checkpoint (prefix "" → `sam`) against segment_anything's ViT-B."""
    write_synthetic_checkpoint(keys_dir / "ref_sam_vit_b.json", tmp_path / "sam_vit_b_01ec64.pth")
    res = runner.invoke(app, ["weights", "verify", "--model", "baseline-feature-crop", "--sam-variant", "vit_b",
                              "--weights-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.split()[:3] == ["ok", "sam", "sam_vit_b_01ec64.pth"]
    res = runner.invoke(app, ["weights", "verify", "--model", "baseline-feature-crop", "--sam-variant", "vit_l",
                              "--weights-dir", str(tmp_path)])
    assert res.exit_code == 1 and "no weight file" in res.stderr


def test_verify_clip_weights(monkeypatch, tmp_path):
    """--clip-weights is loaded strictly into the model's open_clip trunk (here a tiny CLIP)."""
    import open_clip
    from torch import nn

    from ovsam_model.config import TINY_CLIP

    def tiny_model(spec):
        model = nn.Module()
        model.trunk = nn.Module()
        model.trunk.clip = open_clip.CLIP(**TINY_CLIP)
        return model

    monkeypatch.setattr(cli_weights, "_build_random_model", tiny_model)
    good = tmp_path / "clip.bin"
    state = open_clip.CLIP(**TINY_CLIP).state_dict()
    torch.save(state, good)
    args = ["weights", "verify", "--model", "ovsam-rn50x16-coco", "--weights-dir", str(tmp_path)]
    res = runner.invoke(app, [*args, "--clip-weights", str(good)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1].split() == ["ok", "clip", "clip.bin"]

    state["visual.attnpool.c_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.bin")
    res = runner.invoke(app, [*args, "--clip-weights", str(tmp_path / "bad.bin")])
    assert res.exit_code == 1 and "visual.attnpool.c_proj.weight" in res.stdout
