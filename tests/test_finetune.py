"""CLIP2SAM finetuning (`ovsam finetune`): losses, data, trainer, outputs, resume, CLI (tiny model, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from ovsam_cli.finetune import finetune
from ovsam_model.modeling.clip2sam import CLIP2SAMFPN
from ovsam_model.modeling.decoder import OVSAMHead
from ovsam_model.splits import coco_split_ids
from ovsam_model.train import finetune as FT
from ovsam_model.train import finetune_data as FD
from ovsam_model.train import losses as L

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def coco(tmp_path_factory, request):
    """3 mini-val images (the ones with most base and novel instances) + their real annotations."""
    mini = request.getfixturevalue("data_dir") / "coco-val2017-mini"
    if not (mini / "instances.json").is_file():
        pytest.skip("no coco-val2017-mini")
    gt = json.loads((mini / "instances.json").read_text())
    base, novel = coco_split_ids(gt["categories"])
    score = {}
    for a in gt["annotations"]:
        s = score.setdefault(a["image_id"], [0, 0])
        s[0 if a["category_id"] in base else 1] += 1
    ids = sorted(score, key=lambda i: (min(score[i]) > 0, score[i][0] <= 12, -score[i][0]), reverse=True)[:3]
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    gt["images"] = [im for im in gt["images"] if im["id"] in ids]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    for im in gt["images"]:
        shutil.copy(mini / "images" / im["file_name"], root / "images" / im["file_name"])
    (root / "gt.json").write_text(json.dumps(gt))
    return root, gt, set(base), set(novel)


def _cfg(root: Path, out: Path, **kw) -> FT.FinetuneConfig:
    base = dict(model="tiny-256", batch_size=1, epochs=1, lr=1e-3, warmup_iters=1, workers=0, save_every=0, seed=0,
                grad_clip=1.0, num_points=1024)
    base.update(kw)
    return FT.FinetuneConfig(ann=root / "gt.json", images=root / "images", out=out, **base)


# --- losses ------------------------------------------------------------------------------------

def test_point_sample_hand_computation():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # pixel centres at 0.25 / 0.75
    pts = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]])
    got = L.point_sample(maps, pts)
    assert torch.allclose(got, torch.tensor([[[0.0, 1.0, 1.5, 2.0]]]))


def test_uncertain_points_keep_the_uncertain_region():
    logits = torch.full((2, 1, 64, 64), 10.0)
    logits[:, :, :, :32] = 0.0  # the left half is maximally uncertain
    torch.manual_seed(0)
    pts = L.uncertain_points(logits, 400, oversample=3, importance=0.75)
    assert pts.shape == (2, 400, 2) and pts.min() >= 0 and pts.max() <= 1
    # 3·400 draws put ~600 in the left half: the 300 kept (importance) are all there (or on the
    # blended border cell); the 100 fresh uniform ones spread over the whole square
    assert (pts[:, :300, 0] < 0.5 + 1 / 64).all()
    assert (pts[:, 300:, 0] > 0.55).float().mean() > 0.25


def test_bce_and_dice_hand_computation():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    p = [[0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))], [1 / (1 + math.exp(-1))] * 3]
    bce = -sum(t * math.log(q) + (1 - t) * math.log(1 - q)
               for pr, tr in zip(p, targets.tolist()) for q, t in zip(pr, tr)) / 6
    assert L.sigmoid_bce(logits, targets).item() == pytest.approx(bce, rel=1e-6)
    d0 = 1 - (2 * (p[0][0] + p[0][1]) + 1) / (sum(p[0]) + 2 + 1)
    d1 = 1 - (2 * p[1][2] + 1) / (sum(p[1]) + 1 + 1)
    assert L.dice_loss(logits, targets).item() == pytest.approx((d0 + d1) / 2, rel=1e-6)


def test_mask_point_losses_read_gt_at_the_same_points():
    gt = torch.zeros(3, 1, 64, 64)
    gt[:, :, 8:40, 8:40] = 1
    perfect = (gt[:, :, ::4, ::4] * 2 - 1) * 30  # 16² logits matching the 64² mask
    bce, dice = L.mask_point_losses(perfect, gt, 512, generator=torch.Generator().manual_seed(1))
    pts = L.uncertain_points(perfect, 512, generator=torch.Generator().manual_seed(1))
    # GT read at the same normalised points by hand: inside [8/64, 40/64)² (away from the edge cells)
    x, y = pts[..., 0] * 64, pts[..., 1] * 64
    inside = ((x > 8.5) & (x < 39.5) & (y > 8.5) & (y < 39.5)).float()
    outside = ((x < 7.5) | (x > 40.5) | (y < 7.5) | (y > 40.5)).float()
    target = L.point_sample(gt, pts)[:, 0]
    torch.testing.assert_close(target * (inside + outside), inside, atol=1e-5, rtol=0)
    pred = L.point_sample(perfect, pts)[:, 0]
    assert bce.item() == pytest.approx(L.sigmoid_bce(pred, target).item(), rel=1e-6)
    assert dice.item() == pytest.approx(L.dice_loss(pred, target).item(), rel=1e-6)
    bce_bad, dice_bad = L.mask_point_losses(-perfect, gt, 512)
    assert bce_bad.item() > 5 * bce.item() and dice_bad.item() > 0.5 > dice.item()


# --- data --------------------------------------------------------------------------------------

def test_only_base_class_non_crowd_instances(coco):
    root, gt, base, novel = coco
    _, vocab, base_ids = FD.read_annotations(root / "gt.json", "coco")
    assert base_ids == base and len(vocab) == 80 and len(base) == 48
    images = FD.collect_images(gt, root / "images", base_ids)
    kept = {a["id"] for im in images for a in im.anns}
    want = {a["id"] for a in gt["annotations"] if a["category_id"] in base and not a["iscrowd"]}
    assert kept == want and len(images) == 3
    assert any(a["category_id"] in novel for a in gt["annotations"])  # there was something to drop


def test_exif_rotated_and_16_bit_images_train_in_the_annotations_frame(coco, tmp_path):
    """An image stored rotated with EXIF orientation 6 gives the same pixels and masks as the
    upright original (the JSON's frame); a 16-bit grayscale PNG reads; a JSON size that fits
    neither frame is a one-line FinetuneDataError."""
    from PIL import Image

    root, gt, base, _ = coco
    _, vocab, base_ids = FD.read_annotations(root / "gt.json", "coco")
    images = FD.collect_images(gt, root / "images", base_ids, 256)
    item = images[0]
    upright = Image.open(item.file).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored turned 90° clockwise
    rotated = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif.tobytes(), quality=100)
    same = tmp_path / "upright.jpg"
    upright.save(same, quality=100)
    gray = tmp_path / "gray16.png"
    Image.fromarray(np.asarray(upright.convert("L")).astype(np.uint16) * 257).save(gray)
    kw = dict(vocab=vocab, size=256, mean=MEAN, std=STD, aug=FD.Augment(flip=0.0, ratio=(1.0, 1.0)),
              prompts_per_image=4)
    items = {f: FD.FinetuneDataset([FD.TrainImage(f, item.height, item.width, item.anns)], **kw)[0]
             for f in (same, rotated, gray)}
    assert torch.equal(items[rotated]["masks"], items[same]["masks"])
    assert (items[rotated]["pixels"] - items[same]["pixels"]).abs().mean() < 0.05  # JPEG re-encoding only
    assert torch.equal(items[gray]["masks"], items[same]["masks"]) and items[gray]["pixels"].shape == (3, 256, 256)
    wrong = FD.FinetuneDataset([FD.TrainImage(same, item.height + 7, item.width, item.anns)], **kw)
    with pytest.raises(FD.FinetuneDataError, match=r"^cannot read image .*upright\.jpg: "):
        wrong[0]


def test_flip_keeps_masks_boxes_and_pixels_consistent():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    mask = np.zeros((1, 100, 200), dtype=np.uint8)
    mask[0, 20:60, 10:50] = 1
    image[20:60, 10:50] = 255
    rng = np.random.default_rng(0)
    aug = FD.Augment(flip=1.0, ratio=(1.0, 1.0), crop=False, min_area=32)
    draw = FD.draw_augment(rng, 100, 200, 1024, aug)
    assert draw == FD.AugmentDraw(flip=True, nh=512, nw=1024, shrink=False, oy=0, ox=0)
    pixels, out, keep = FD.apply_augment(image, mask, 1024, draw, aug.min_area, MEAN, STD)
    assert keep.tolist() == [True] and out.shape == (1, 1024, 1024)
    # scale 1024 / 200 = 5.12; flipped columns 150..190 → 768..972.8, rows 20..60 → 102.4..307.2
    assert FD.mask_box(out[0]) == [768.0, 102.0, 973.0, 307.0]
    white = (np.array([255.0, 255.0, 255.0]) - np.array(MEAN)) / np.array(STD)
    inner = pixels[:, 110:300, 780:960]
    assert torch.allclose(inner, torch.tensor(white, dtype=torch.float32).view(3, 1, 1).expand_as(inner), atol=1e-4)
    assert (pixels[:, 512:, :] == 0).all()  # padding below the 512-row image
    assert out[0, 110:300, 780:960].all() and not out[0, :, :760].any()


def test_prompts_forty_half_boxes_half_points_inside_masks(coco):
    root, gt, _, _ = coco
    _, vocab, base_ids = FD.read_annotations(root / "gt.json", "coco")
    images = FD.collect_images(gt, root / "images", base_ids)
    ds = FD.FinetuneDataset(images, vocab, 1024, MEAN, STD, FD.Augment(ratio=(0.9, 2.0)), 40, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        masks, inst = item["masks"], item["instance"]
        assert item["pixels"].shape == (3, 1024, 1024) and len(inst) == 40
        assert item["is_box"].sum() == 20 and item["is_box"][:20].all()
        assert (masks.flatten(1).sum(1) >= 32).all()
        if masks.shape[0] <= 40:
            assert set(inst.tolist()) == set(range(masks.shape[0]))  # every instance repeated in
        for j in range(40):
            m = masks[inst[j]].numpy()
            if j < 20:
                assert item["boxes"][j].tolist() == FD.mask_box(m)
            else:
                x, y = item["points"][j, 0].long().tolist()
                assert m[y, x]
        cats = {vocab.category_ids[c] for c in item["labels"].tolist()}
        assert cats <= base_ids
    again = ds[0]  # deterministic per (seed, epoch, index)
    assert torch.equal(again["boxes"], ds[0]["boxes"]) and torch.equal(again["pixels"], ds[0]["pixels"])


# --- trainer -----------------------------------------------------------------------------------

def test_loss_decreases_on_a_fixed_batch_and_only_trainable_parts_change(coco, tmp_path):
    root, gt, _, _ = coco
    cfg = _cfg(root, tmp_path, lr=2e-3)
    model = FT.build_finetune_model(cfg)
    _, vocab, base_ids = FD.read_annotations(root / "gt.json", "coco")
    images = FD.collect_images(gt, root / "images", base_ids, 256)
    ds = FD.FinetuneDataset(images, vocab, 256, MEAN, STD, FD.Augment(), 8, seed=0)
    batch = FD.collate([ds[0]])
    emb = FT.text_embeddings(vocab, model.trunk)
    trainer = FT._Trainer(cfg, model, emb, torch.device("cpu"), 0, 1, 10, 10)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("fpn.", "head."))}
    trained = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("fpn.", "head."))}
    model.eval()
    trainer.trainable.train()
    losses = [trainer.train_step(batch)["loss"] for _ in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # CLIP, adapter, prompt encoder
    for k in ("fpn.fpn.inner_blocks.3.0.weight", "head.mask_decoder.mask_tokens.weight", "head.roi_conv.0.conv.weight",
              "head.label_token.weight"):
        assert not torch.equal(now[k], trained[k]), k
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in list(model.fpn.parameters()) + list(model.head.parameters())}


def test_one_decode_call_for_the_batch_equals_one_per_prompt_group(coco, tmp_path):
    """`CLIP2SAMTrainable` decodes every prompt of a batch (2 images, box and click groups) in
    one call: the same logits, region embeddings and gradients as one `head.decode` per group."""
    root, gt, _, _ = coco
    cfg = _cfg(root, tmp_path)
    model = FT.build_finetune_model(cfg)
    _, vocab, base_ids = FD.read_annotations(root / "gt.json", "coco")
    images = FD.collect_images(gt, root / "images", base_ids, 256)
    ds = FD.FinetuneDataset(images, vocab, 256, MEAN, STD, FD.Augment(), 6, seed=0)
    batch = FD.collate([ds[0], ds[1]])
    with torch.no_grad():
        feats = model.trunk(batch["pixels"])
        emb = model.adapter(feats)
        groups = []
        for b in range(2):
            box = batch["is_box"][b]
            sparse, dense, pe = model.encode_prompts(batch["boxes"][b][box], None, None)
            groups.append((b, sparse, dense, batch["boxes"][b][box]))
            pts = batch["points"][b][~box]
            sparse, dense, pe = model.encode_prompts(None, pts, torch.ones(pts.shape[:2], dtype=torch.long))
            groups.append((b, sparse, dense, batch["boxes"][b][~box]))
    trainable = FT.CLIP2SAMTrainable(model.fpn, model.head, model.cfg.roi_size, model.cfg.finest_scale)
    g = torch.Generator().manual_seed(0)
    w_mask, w_region = torch.randn(12, 1, 64, 64, generator=g), torch.randn(12, 64, generator=g)

    def run(forward):
        trainable.zero_grad(set_to_none=True)
        masks, region = forward()
        ((masks * w_mask).sum() + (region * w_region).sum()).backward()
        return masks.detach(), region.detach(), {k: p.grad.clone() for k, p in trainable.named_parameters()
                                                 if p.grad is not None}

    def per_group():
        fpn = trainable.fpn(feats)
        out = [trainable.head.decode(emb[b : b + 1], pe, sparse, dense) for b, sparse, dense, _ in groups]
        rois = torch.cat([torch.cat([bx.new_full((len(bx), 1), float(b)), bx], 1) for b, _, _, bx in groups])
        roi_feats = FT.multilevel_roi_align(fpn, rois, model.cfg.roi_size, finest_scale=model.cfg.finest_scale)
        region = trainable.head.region_embed(roi_feats, torch.cat([lab for _, lab in out]))
        return torch.cat([m for m, _ in out]), region + 0.0 * sum(f.mean() for f in fpn)

    masks, region, grads = run(lambda: trainable(feats, emb, pe, groups))
    ref_masks, ref_region, ref_grads = run(per_group)
    assert masks.shape == (12, 1, 64, 64) and ref_masks.std() > 0
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=1e-5 * ref_masks.abs().max().item())
    torch.testing.assert_close(region, ref_region, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 40
    # k_proj biases cancel in the softmax (zero gradient in exact arithmetic): their rounding noise
    # is judged against the largest gradient of all
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for k, ref in ref_grads.items():
        err = (grads[k] - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item() + 1e-6 * largest, (k, err)


def test_lr_schedule_warmup_then_steps():
    # warm-up 4, milestones at iterations 10 and 15
    assert FT.lr_factor(0, 4, [10, 15]) == pytest.approx(0.25)
    assert FT.lr_factor(3, 4, [10, 15]) == pytest.approx(1.0)
    assert FT.lr_factor(9, 4, [10, 15]) == pytest.approx(1.0)
    assert FT.lr_factor(10, 4, [10, 15]) == pytest.approx(0.1)
    assert FT.lr_factor(15, 4, [10, 15]) == pytest.approx(0.01)


def test_official_layout_keys(keys_dir):
    tiny = FT.build_finetune_model(FT.FinetuneConfig(ann=Path("x"), images=Path("y"), out=Path("z"), model="tiny"))
    state = FT.official_state(tiny.fpn, tiny.head)
    fpn = {CLIP2SAMFPN.official_key_map(k[len("fpn_neck."):]): v for k, v in state.items() if k.startswith("fpn_neck.")}
    head = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
    assert len(fpn) + len(head) == len(state)
    tiny.fpn.load_state_dict(fpn, strict=True)
    tiny.head.load_state_dict(head, strict=True)
    layout = json.loads((keys_dir / "clip2sam_coco_rn50x16.json").read_text())["keys"]
    full = {k: list(v.shape) for k, v in FT.official_state(CLIP2SAMFPN(), OVSAMHead()).items()}
    assert full == layout


def test_cached_features_train_as_without_the_cache(coco, tmp_path, monkeypatch):
    """--cache-features: the same run (losses and weights), each image read and its frozen
    features computed once per flip instead of once per epoch."""
    root = coco[0]
    reads: list[str] = []
    read_image = FD.read_image
    monkeypatch.setattr(FD, "read_image", lambda path, **kw: reads.append(Path(path).name) or read_image(path, **kw))
    trunk_images: list[int] = []
    compute = FT.FrozenFeatures.compute
    monkeypatch.setattr(FT.FrozenFeatures, "compute",
                        lambda self, pixels: trunk_images.append(pixels.shape[0]) or compute(self, pixels))
    kw = dict(epochs=4, batch_size=2, resize_ratio=(1.0, 1.0), flip=0.5, num_points=256, prompts_per_image=4)
    plain = FT.run_finetune(_cfg(root, tmp_path / "plain", **kw), progress=False)
    plain_reads, plain_trunk = len(reads), sum(trunk_images)
    reads.clear()
    trunk_images.clear()
    cached = FT.run_finetune(_cfg(root, tmp_path / "cached", cache_features=True, **kw), progress=False)
    assert plain.step == cached.step == 8 and plain_reads == plain_trunk == 12  # 3 images × 4 epochs
    # each image read once per distinct flip it met (at most 2), features computed as often
    assert 3 <= len(reads) == sum(trunk_images) <= 6 < plain_reads
    assert all(reads.count(name) <= 2 for name in set(reads))
    for a, b in zip(plain.losses, cached.losses):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    a = torch.load(tmp_path / "plain" / FT.FINETUNED, weights_only=True)
    b = torch.load(tmp_path / "cached" / FT.FINETUNED, weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)


def test_cached_features_need_one_scale_and_the_memory(coco, tmp_path, monkeypatch):
    root = coco[0]
    with pytest.raises(FT.FinetuneError, match=r"^--cache-features needs one scale of at most 1 .*0\.9 and 1\.1"):
        FT.run_finetune(_cfg(root, tmp_path / "a", cache_features=True, resize_ratio=(0.9, 1.1)), progress=False)
    with pytest.raises(FT.FinetuneError, match=r"2 and 2\)"):
        FT.run_finetune(_cfg(root, tmp_path / "b", cache_features=True, resize_ratio=(2.0, 2.0)), progress=False)
    monkeypatch.setattr(FT, "free_memory", lambda device: 10**6)  # 1 MB free
    with pytest.raises(FT.FinetuneError, match=r"^--cache-features would keep about [0-9.]+ MB of frozen features "
                                               r"\(4 image draws\) with 1\.0 MB free on cpu"):
        FT.run_finetune(_cfg(root, tmp_path / "c", cache_features=True, resize_ratio=(1.0, 1.0), max_iters=2),
                        progress=False)


@pytest.mark.gpu
def test_cuda_runs_as_the_cpu_and_its_cache_as_without(coco, tmp_path):
    """On CUDA: fp32 iterations give the CPU's losses; under bf16 autocast (the default) the
    losses stay finite, and --cache-features gives the uncached run's losses."""
    root = coco[0]
    kw = dict(epochs=2, batch_size=2, resize_ratio=(1.0, 1.0), flip=0.5, num_points=256, prompts_per_image=8)
    cpu = FT.run_finetune(_cfg(root, tmp_path / "cpu", amp=False, **kw), progress=False)
    cuda = FT.run_finetune(_cfg(root, tmp_path / "cuda", device="cuda", amp=False, **kw), progress=False)
    for a, b in zip(cpu.losses, cuda.losses):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    bf16 = FT.run_finetune(_cfg(root, tmp_path / "bf16", device="cuda", **kw), progress=False)
    cached = FT.run_finetune(_cfg(root, tmp_path / "bf16c", device="cuda", cache_features=True, **kw),
                             progress=False)
    assert all(math.isfinite(r["loss"]) for r in bf16.losses)
    for a, b in zip(bf16.losses, cached.losses):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_resume_matches_uninterrupted_run(coco, tmp_path, monkeypatch):
    root = coco[0]
    # batch 1, 3 images, max 4 iterations (epoch 1 starts at 3); interrupted after 3
    kw = dict(epochs=2, max_iters=4, save_every=2)
    full = FT.run_finetune(_cfg(root, tmp_path / "full", **kw), progress=False)
    assert full.step == 4 and full.images == 3 and len(full.losses) == 4
    orig = FT._Trainer.train_step

    def stop_after_3(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(FT._Trainer, "train_step", stop_after_3)
    with pytest.raises(FT.FinetuneInterrupted) as info:
        FT.run_finetune(_cfg(root, tmp_path / "cut", **kw), progress=False)
    assert info.value.step == 3
    cut = torch.load(tmp_path / "cut" / FT.LAST, weights_only=False)
    assert cut["step"] == 3 and cut["epoch"] == 1
    monkeypatch.setattr(FT._Trainer, "train_step", orig)
    rest = FT.run_finetune(_cfg(root, tmp_path / "cut", resume=True, **kw), progress=False)
    assert rest.step == 4 and len(rest.losses) == 1
    assert rest.losses[0]["loss"] == pytest.approx(full.losses[3]["loss"], rel=1e-5)
    a = torch.load(tmp_path / "full" / FT.FINETUNED, weights_only=True)
    b = torch.load(tmp_path / "cut" / FT.FINETUNED, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    moved = max((a["mask_decoder." + k] - v).abs().max().item() for k, v in cut["head"].items())
    assert moved > 1e-4  # the last step moved the weights well beyond the tolerance
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(FT.FinetuneError, match=r"other options: --max-iters 4 \(now 5\)$"):
        FT.run_finetune(_cfg(root, tmp_path / "cut", resume=True, epochs=2, max_iters=5), progress=False)
    old_format = tmp_path / "old" / FT.LAST  # a pickled state of an older version is refused, never unpickled
    old_format.parent.mkdir()
    torch.save({"step": 3, "rng": {"numpy": __import__("numpy").random.get_state()}}, old_format)
    with pytest.raises(FT.FinetuneError, match="not a training state this version can load safely"):
        FT.run_finetune(_cfg(root, tmp_path / "old", resume=True, **kw), progress=False)


# --- CLI ---------------------------------------------------------------------------------------

def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("finetune", no_args_is_help=True)(finetune)

    @app.command("other")
    def other() -> None:  # keeps `finetune` a sub-command, as in ovsam_cli.main
        pass

    return app


def test_cli_smoke_run(coco, tmp_path):
    root = coco[0]
    result = CliRunner().invoke(_app(), ["finetune", "--ann", str(root / "gt.json"), "--images", str(root / "images"),
                                         "--out", str(tmp_path / "o"), "--model", "tiny", "--max-iters", "1",
                                         "--batch-size", "1", "--prompts-per-image", "4", "--workers", "0",
                                         "--flip", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "o" / FT.FINETUNED)
    assert (tmp_path / "o" / FT.LAST).is_file()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["options"]["flip"] == 0.0


@pytest.mark.parametrize("case", ["ann", "images", "resume", "milestones", "checkpoint"])
def test_cli_user_errors(case, coco, tmp_path):
    root = coco[0]
    args = ["finetune", "--ann", str(root / "gt.json"), "--images", str(root / "images"), "--out", str(tmp_path / "o"),
            "--model", "tiny", "--device", "cpu", "--workers", "0"]
    if case == "ann":
        args[2], expect = str(tmp_path / "nope.json"), "no such file"
    elif case == "images":
        args[4], expect = str(tmp_path / "nope"), "no such folder"
    elif case == "resume":
        args += ["--resume"]
        expect = "no " + str(tmp_path / "o" / FT.LAST)
    elif case == "milestones":
        args += ["--milestones", "8,x"]
        expect = "--milestones"
    else:
        args += ["--checkpoint", "sam=x.pth"]
        expect = "unknown component"
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.stderr


# --- recipe ------------------------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune_clip2sam.sh"


def test_recipe_rejects_unknown_dataset(tmp_path):
    proc = subprocess.run(["bash", str(RECIPE), "voc", "a.json", "imgs", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "coco or lvis" in proc.stderr


def test_recipe_smoke_run(coco, tmp_path):
    from ovsam_cli.main import app

    if "finetune" not in {c.name for c in app.registered_commands}:
        pytest.skip("ovsam finetune is not registered in ovsam_cli.main yet")
    root = coco[0]
    env = {**os.environ, "OVSAM_RECIPE_MODEL": "tiny"}
    proc = subprocess.run(["bash", str(RECIPE), "coco", str(root / "gt.json"), str(root / "images"), str(tmp_path / "o"),
                           "--max-iters", "1", "--batch-size", "1", "--prompts-per-image", "4", "--workers", "0",
                           "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / FT.FINETUNED).is_file()


def test_decoder_starts_from_sams_single_mask_token(tmp_path):
    """CLIP2SAM's one-token decoder is initialised from SAM's decoder (token 0, no IoU branch)."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from ovsam_model.config import TINY

    sam_decoder = MaskDecoder(transformer_dim=TINY.prompt_dim, num_multimask_outputs=3,
                              transformer=TwoWayTransformer(depth=TINY.decoder_depth, embedding_dim=TINY.prompt_dim,
                                                            mlp_dim=TINY.decoder_mlp_dim, num_heads=TINY.decoder_heads))
    sam_file = tmp_path / "sam.pth"
    torch.save({"mask_decoder." + k: v for k, v in sam_decoder.state_dict().items()}
               | {"image_encoder.neck.0.weight": torch.zeros(1)}, sam_file)
    model = FT.build_finetune_model(FT.FinetuneConfig(ann=Path("x"), images=Path("y"), out=Path("z"), model="tiny",
                                                      sam_decoder=sam_file))
    ours = model.head.mask_decoder.state_dict()
    ref = sam_decoder.state_dict()
    torch.testing.assert_close(ours["mask_tokens.weight"], ref["mask_tokens.weight"][:1])
    torch.testing.assert_close(ours["transformer.layers.0.self_attn.q_proj.weight"],
                               ref["transformer.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(ours["output_hypernetworks_mlps.0.layers.2.weight"],
                               ref["output_hypernetworks_mlps.0.layers.2.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"image_encoder.x": torch.zeros(1)}, bad)
    with pytest.raises(FT.FinetuneError, match="mask_decoder"):
        FT.build_finetune_model(FT.FinetuneConfig(ann=Path("x"), images=Path("y"), out=Path("z"), model="tiny",
                                                  sam_decoder=bad))


@pytest.mark.slow
def test_two_processes_train_as_one(coco, tmp_path):
    """torchrun with 2 CPU processes (gloo) and a global batch of 2 images gives the weights of
    one process with the same global batch (within fp tolerance), for both commands; every
    trainable parameter gets a gradient on every step (an FPN level without RoIs once made the
    second step fail), only rank 0 writes, and the metrics log has each step once."""
    import os
    import subprocess
    import sys

    root, gt = coco[0], coco[1]
    two = {**gt, "images": gt["images"][:2]}
    two["annotations"] = [a for a in gt["annotations"] if a["image_id"] in {im["id"] for im in two["images"]}]
    (tmp_path / "two.json").write_text(json.dumps(two))
    images = tmp_path / "images2"
    images.mkdir()
    for im in two["images"]:
        (images / im["file_name"]).symlink_to(root / "images" / im["file_name"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    common = ["--model", "tiny-256", "--batch-size", "2", "--epochs", "3", "--workers", "0", "--device", "cpu",
              "--quiet", "--lr", "1e-3", "--warmup-iters", "1", "--grad-clip", "1.0"]
    jobs = {
        "finetune": ["finetune", "--ann", str(tmp_path / "two.json"), "--images", str(images),
                     "--prompts-per-image", "8", *common],
        "distill": ["distill", "--images", str(images), "--teacher", "tiny", *common],
    }
    for name, args in jobs.items():
        outs = {}
        for procs, launcher in (("one", [sys.executable]), ("two", torchrun)):
            out = tmp_path / f"{name}-{procs}"
            done = subprocess.run([*launcher, "-m", "ovsam_cli", *args, "--out", str(out)], capture_output=True,
                                  text=True, timeout=300, env=env)
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # any rank's
            assert done.returncode == 0, (errors, done.stderr[-2000:])
            steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert steps == [1, 2, 3], (name, procs)
            outs[procs] = torch.load(out / (FT.FINETUNED if name == "finetune" else "sam2clip_distilled.pth"),
                                     weights_only=True)
        one, two_ = outs["one"], outs["two"]
        assert one.keys() == two_.keys()
        for k in one:
            # the gradient is summed in another order: Adam can lift a ~1e-7 difference of a
            # near-zero gradient to ~1e-4 of one element, while a step moves weights by ~1e-3
            torch.testing.assert_close(two_[k], one[k], atol=2e-4, rtol=1e-3, msg=lambda m: f"{name} {k}: {m}")
        if name == "finetune":  # the runs trained: their weights moved well beyond the tolerance
            start = FT.build_finetune_model(FT.FinetuneConfig(ann=Path("x"), images=Path("y"), out=Path("z"),
                                                              model="tiny-256"))
            start = FT.official_state(start.fpn, start.head)
            assert max((one[k] - start[k]).abs().max().item() for k in start) > 2e-3


def test_cli_ctrl_c_names_the_saved_state_and_the_resume_command(coco, tmp_path, monkeypatch):
    """Ctrl-C: exit 130, where last.pth was saved, and this command line with one --resume."""
    root, out = coco[0], tmp_path / "o"
    args = ["finetune", "--ann", str(root / "gt.json"), "--images", str(root / "images"), "--out", str(out),
            "--model", "tiny", "--device", "cpu", "--workers", "0", "--resume"]

    def interrupted(cfg, progress=True):
        raise FT.FinetuneInterrupted(7, Path(cfg.out) / FT.LAST)

    monkeypatch.setattr(FT, "run_finetune", interrupted)
    monkeypatch.setattr("sys.argv", ["ovsam", *args])
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 130, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == f"interrupted at iteration 7; saved {out / FT.LAST}"
    assert lines[-1].startswith("resume with: ovsam finetune --ann ") and lines[-1].count("--resume") == 1
    assert lines[-1].endswith("--workers 0 --resume")
