"""SAM2CLIP distillation (`ovsam distill`): tiny student + tiny teacher on real COCO images, CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import typer
from segment_anything.modeling.image_encoder import ImageEncoderViT
from typer.testing import CliRunner

from ovsam_cli.distill import distill
from ovsam_model.builder import build_model
from ovsam_model.checkpoint import load_weight_file
from ovsam_model.modeling.sam2clip import SAM2CLIPAdapter
from ovsam_model.registry import SAM2CLIP
from ovsam_model.train import distill as D
from ovsam_model.train.schedule import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
)
from ovsam_model.train.teacher_cache import build_teacher

TINY_DIMS = (64, 32)  # the tiny adapter's width and output channels (config.TINY)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, request) -> Path:
    data = request.getfixturevalue("data_dir")
    src = sorted((data / "coco-val2017-mini" / "images").glob("*.jpg"))[:2]
    if len(src) < 2:
        pytest.skip("need 2 images in coco-val2017-mini")
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub").mkdir()
    shutil.copy(src[0], root / src[0].name)
    shutil.copy(src[1], root / "sub" / src[1].name)  # found recursively
    return root


def _cfg(images: Path, out: Path, **kw) -> D.DistillConfig:
    base = dict(model="tiny-256", teacher="tiny", batch_size=2, epochs=1, lr=1e-3, warmup_iters=1, workers=0,
                save_every=0, seed=0)
    base.update(kw)
    return D.DistillConfig(images=images, out=out, **base)


@pytest.fixture(scope="module")
def trained(image_dir, tmp_path_factory):
    """One 8-iteration run (the whole 2-image set in every batch), counting teacher images."""
    out = tmp_path_factory.mktemp("run")
    seen = []
    orig = ImageEncoderViT.forward
    ImageEncoderViT.forward = lambda self, x: (seen.append(x.shape[0]), orig(self, x))[1]
    try:
        result = D.run_distill(_cfg(image_dir, out, epochs=8), progress=False)
    finally:
        ImageEncoderViT.forward = orig
    return out, result, sum(seen)


def test_loss_decreases(trained):
    _, result, _ = trained
    assert len(result.losses) == 8 and result.step == 8 and result.total == 8
    assert all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-3:]) / 3 < 0.8 * result.losses[0]


def test_teacher_runs_once_per_image_and_cache_is_reused(trained, image_dir, tmp_path, monkeypatch):
    out, result, teacher_images = trained
    assert teacher_images == 2 and result.teacher_computed == 2  # 8 epochs, 2 images: teacher ran once each
    files = sorted((out / "teacher_cache").glob("*.pt"))
    assert len(files) == 2
    emb = torch.load(files[0], weights_only=True)
    assert emb.dtype == torch.float16 and tuple(emb.shape) == (32, 16, 16)
    # the cached embedding is the teacher's output on the padded 256 input (tiny-256)
    teacher, _ = build_teacher("tiny", image_size=256, tiny_dims=TINY_DIMS)
    cache = D.TeacherCache(out / "teacher_cache", D.teacher_identity("tiny", tiny_dims=TINY_DIMS), 256)
    img = D.find_images(image_dir)[0]
    with torch.no_grad():
        ref = teacher(D.load_pixels(img, 256, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))[None])[0]
    torch.testing.assert_close(cache.load(img), ref, atol=2e-3, rtol=2e-3)
    # another run with the same cache: no teacher forward, files untouched
    mtimes = [f.stat().st_mtime_ns for f in files]
    calls = []
    orig = ImageEncoderViT.forward
    monkeypatch.setattr(ImageEncoderViT, "forward", lambda self, x: (calls.append(1), orig(self, x))[1])
    again = D.run_distill(_cfg(image_dir, tmp_path / "b", teacher_cache=out / "teacher_cache", max_iters=1),
                          progress=False)
    assert calls == [] and again.teacher_computed == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # a changed image (new mtime) is a new key
    touched = img.stat()
    os.utime(img, ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))
    assert not cache.has(img)
    os.utime(img, ns=(touched.st_atime_ns, touched.st_mtime_ns))


def test_fill_cache_ranks_split_the_images_whenever_they_look(tmp_path):
    """Each rank's share is fixed by the image list, not by what is missing when it looks: rank 1
    starting after rank 0 has written its image still computes its own (a share of the missing
    images once skipped it, and distill then failed on a cache file no rank had written)."""
    images = []
    for i in range(5):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(bytes([i]))
    cache = D.TeacherCache(tmp_path / "cache", "test", 16)
    computed = {0: [], 1: []}

    def fill(rank: int) -> int:
        def teacher(pixels):
            computed[rank].append(pixels.shape[0])
            return pixels[:, :1]
        return D.fill_cache(cache, images, teacher, lambda p: torch.full((3, 4, 4), float(p.stem)),
                            device=torch.device("cpu"), batch_size=2, rank=rank, world_size=2)

    assert fill(0) == 3  # images 0, 2, 4
    assert fill(1) == 2  # images 1, 3, although 0, 2, 4 are written by now
    assert all(cache.has(p) for p in images)
    assert [cache.load(p)[0, 0, 0].item() for p in images] == [0, 1, 2, 3, 4]
    assert fill(0) == 0 and fill(1) == 0  # a full cache: nothing computed again


def test_fill_cache_workers_write_the_same_cache(data_dir, tmp_path):
    """The teacher's inputs read in 2 DataLoader workers: the same cache files, bit for bit, as
    in this process, for one process and for two ranks splitting the images (real images, the
    tiny teacher, a short last batch); an unreadable image stops the pass with its own error."""
    from functools import partial

    images = sorted((data_dir / "coco-val2017-mini" / "images").glob("*.jpg"))[:5]
    if len(images) < 5:
        pytest.skip("need 5 images in coco-val2017-mini")
    teacher, identity = build_teacher("tiny", image_size=256, tiny_dims=TINY_DIMS)
    load = partial(D.load_pixels, size=256, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    caches = {}
    for ranks in ([(0, 1)], [(0, 2), (1, 2)]):
        for workers in (0, 2):
            cache = D.TeacherCache(tmp_path / f"{len(ranks)}-{workers}", identity, 256)
            sizes = []
            computed = sum(D.fill_cache(cache, images, teacher, load, device=torch.device("cpu"), batch_size=2,
                                        rank=rank, world_size=world, workers=workers, progress=sizes.append)
                           for rank, world in ranks)
            assert computed == 5 and sum(sizes) == 5
            caches[len(ranks), workers] = {f.name: torch.load(f, weights_only=True)
                                           for f in sorted(cache.root.glob("*.pt"))}
    for ranks in (1, 2):
        main, workers = caches[ranks, 0], caches[ranks, 2]
        assert len(main) == 5 and workers.keys() == main.keys()
        assert all(torch.equal(workers[k], main[k]) for k in main)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(D.DistillError, match="^cannot read image .*broken.jpg"):
        D.fill_cache(D.TeacherCache(tmp_path / "b", identity, 256), [images[0], broken], teacher, load,
                     device=torch.device("cpu"), batch_size=1, workers=2)


def test_schedule_warmup_then_cosine():
    # hand computation: warmup 4, total 12, floor 1 %
    assert lr_factor(0, 4, 12) == pytest.approx(0.25)
    assert lr_factor(3, 4, 12) == pytest.approx(1.0)
    assert lr_factor(4, 4, 12) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(8, 4, 12) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way: cos(π/2) = 0
    assert lr_factor(6, 4, 12) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(12, 4, 12) == pytest.approx(0.01)
    # the torch scheduler follows it, stepping once per iteration
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = build_scheduler(opt, 4, 12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-4 * lr_factor(s, 4, 12) for s in range(12)])


def test_no_decay_on_norms_biases_level_embedding_and_pos_embed_not_trained():
    adapter = SAM2CLIPAdapter((32, 64, 128, 256), 64, 2, 2, 14, (1,), 64, 32)
    decay, no_decay = param_groups(adapter, 0.05)
    names = {id(p): n for n, p in adapter.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    assert "level_encoding.weight" in no_decay_names
    assert "neck.1.weight" in no_decay_names and "neck.1.bias" in no_decay_names  # LayerNorm2d
    assert "blocks.0.norm1.weight" in no_decay_names and "blocks.0.attn.qkv.bias" in no_decay_names
    assert "blocks.0.attn.qkv.weight" in decay_names and "patch_embeds.3.projection.weight" in decay_names
    opt = build_optimizer(adapter, 1e-4, 0.05)
    assert opt.defaults["betas"] == (0.9, 0.999)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(adapter.pos_embed) not in in_opt and "pos_embed" in adapter.state_dict()


def test_pos_embed_copied_from_teacher_and_kept_fixed(trained):
    out, result, _ = trained
    teacher, _ = build_teacher("tiny", image_size=256, tiny_dims=TINY_DIMS)
    state = torch.load(out / D.LAST, weights_only=False)
    assert teacher.pos_embed.abs().sum() > 0
    assert torch.equal(state["adapter"]["pos_embed"], teacher.pos_embed.detach())
    assert any("copied" in n for n in result.notes)


def test_official_layout_loads_strictly(trained):
    out, _, _ = trained
    payload = torch.load(out / D.DISTILLED, weights_only=True)
    assert all(k.startswith("neck_student.") for k in payload)
    state = torch.load(out / D.LAST, weights_only=False)["adapter"]
    stripped = {k[len("neck_student."):]: v for k, v in payload.items()}
    assert stripped.keys() == state.keys() and all(torch.equal(stripped[k], state[k]) for k in state)
    adapter = build_model("tiny-256", random_weights=True).adapter
    adapter.load_state_dict(stripped, strict=True)
    model = build_model("tiny-256", random_weights=True)
    load_weight_file(model, SAM2CLIP, out / D.DISTILLED)  # the loader `ovsam label --checkpoint sam2clip=` uses
    assert torch.equal(model.adapter.blocks[0].attn.qkv.weight, stripped["blocks.0.attn.qkv.weight"])


def test_full_size_official_key_set(keys_dir):
    layout = json.loads((keys_dir / "sam2clip_vith_rn50x16.json").read_text())["keys"]
    adapter = SAM2CLIPAdapter()
    mine = {k: list(v.shape) for k, v in D.official_state(adapter).items()}
    assert mine == layout


def test_resume_matches_uninterrupted_run(image_dir, tmp_path, monkeypatch):
    # batch 1, 2 images, 2 epochs: 4 iterations; interrupted after 3 (mid-epoch 1)
    kw = dict(batch_size=1, epochs=2, save_every=2)
    full = D.run_distill(_cfg(image_dir, tmp_path / "full", **kw), progress=False)
    orig = D._Trainer.train_step

    def stop_after_3(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(D._Trainer, "train_step", stop_after_3)
    with pytest.raises(D.DistillInterrupted) as info:
        D.run_distill(_cfg(image_dir, tmp_path / "cut", **kw), progress=False)
    assert info.value.step == 3
    cut_state = torch.load(tmp_path / "cut" / D.LAST, weights_only=False)
    assert cut_state["step"] == 3 and cut_state["epoch"] == 1
    monkeypatch.setattr(D._Trainer, "train_step", orig)
    rest = D.run_distill(_cfg(image_dir, tmp_path / "cut", resume=True, **kw), progress=False)
    assert rest.step == 4 and len(rest.losses) == 1 and rest.teacher_computed == 0
    # CPU kernels on several threads are not bit-reproducible (two uninterrupted runs differ by
    # ~1e-6), so "the same weights" means within 1e-5, far below what one step changes.
    assert rest.losses[0] == pytest.approx(full.losses[3], rel=1e-5)
    a = torch.load(tmp_path / "full" / D.DISTILLED, weights_only=True)
    b = torch.load(tmp_path / "cut" / D.DISTILLED, weights_only=True)
    at3 = torch.load(tmp_path / "cut" / D.LAST, weights_only=False)  # now the final state
    assert at3["step"] == 4 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    step3 = cut_state["adapter"]
    moved = max((a["neck_student." + k] - v).abs().max().item() for k, v in step3.items())
    assert moved > 1e-4  # the last step (lr 2.6e-4) moved the weights well beyond the tolerance
    # the log holds every step once, across the interruption; last.pth loads without pickle
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert torch.load(tmp_path / "cut" / D.LAST, weights_only=True)["step"] == 4
    # other options or another model: refused in one line naming what differs, not silently mixed
    with pytest.raises(D.DistillError, match=r"other options: --epochs 2 \(now 3\)$"):
        D.run_distill(_cfg(image_dir, tmp_path / "cut", resume=True, batch_size=1, epochs=3), progress=False)
    with pytest.raises(D.DistillError, match=r"--model tiny-256 \(now tiny\)"):
        D.run_distill(_cfg(image_dir, tmp_path / "cut", resume=True, model="tiny", **kw), progress=False)


# --- CLI ---------------------------------------------------------------------------------------

def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("distill", no_args_is_help=True)(distill)

    @app.command("other")
    def other() -> None:  # a second command keeps `distill` a sub-command, as in ovsam_cli.main
        pass

    return app


def test_cli_smoke_run(image_dir, tmp_path):
    result = CliRunner().invoke(_app(), ["distill", "--images", str(image_dir), "--out", str(tmp_path / "o"),
                                         "--model", "tiny", "--teacher", "tiny", "--max-iters", "1",
                                         "--batch-size", "2", "--workers", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "o" / D.DISTILLED)
    assert (tmp_path / "o" / D.LAST).is_file()


@pytest.mark.parametrize("case", ["missing", "empty", "resume", "checkpoint"])
def test_cli_user_errors(case, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    args = ["distill", "--images", str(empty), "--out", str(tmp_path / "o"), "--model", "tiny", "--teacher", "tiny",
            "--device", "cpu", "--workers", "0"]
    expect = "no .jpg/.jpeg/.png images"
    if case == "missing":
        args[2], expect = str(tmp_path / "nope"), "no such folder"
    elif case == "resume":
        args += ["--resume"]
        expect = "no " + str(tmp_path / "o" / D.LAST)
    elif case == "checkpoint":
        args += ["--checkpoint", "clip2sam=x.pth"]
        expect = "unknown component"
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.stderr


def test_a_second_run_on_the_same_folder_stops_at_once(image_dir, tmp_path):
    from ovsam_model.train.run_log import claim_run_folder

    out = tmp_path / "busy"
    held = claim_run_folder(out)  # as a first run does for its whole life
    try:
        with pytest.raises(D.DistillError, match=rf"{out} is being written by another training run \(pid {os.getpid()}"):
            D.run_distill(_cfg(image_dir, out, max_iters=1), progress=False)
        assert not (out / D.LAST).exists() and not (out / "metrics.jsonl").exists()
    finally:
        held.close()
    assert D.run_distill(_cfg(image_dir, out, max_iters=1), progress=False).step == 1  # free once released
