"""CLIP2SAM finetuning (spec §6): train the FPN and the OVSAM head (decoder, label token/MLP,
roi_conv) on COCO base classes or LVIS frequent+common, with CLIP, the SAM2CLIP adapter and the
prompt encoder frozen (run under no_grad).

Per image 40 prompts (half GT boxes, half one positive point); per prompt: the mask decoder's
256² logits (BCE 5.0 + Dice 5.0 on 12,544 uncertainty-sampled points) and the region embedding
pooled on the GT box from the FPN (CE 2.0 over every dataset class + background, weight 0.1).

One process on CPU or one GPU, or several under torchrun (DistributedDataParallel on FPN + head,
DistributedSampler; only rank 0 writes). Outputs in `out`: `last.pth` (what `resume` continues
from) and `clip2sam_finetuned.pth` in the released `clip2sam_*.pth` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from ..builder import build_model, resolve_spec
from ..classify import add_background, class_logits, classification_loss
from ..modeling.clip2sam import CLIP2SAMFPN, multilevel_roi_align
from ..checkpoint import read_checkpoint
from ..modeling.decoder import OVSAMHead, one_token_state_from_sam
from ..modeling.ovsam import OVSAM
from ..eval.prompt import PUBLISHED_MASK_POSTPROCESS
from ..runtime import free_memory, human_size
from ..vocab import load_vocabulary, seen_mask, text_embeddings, vocabulary_from_categories
from .common import (
    ResumableTrainer,
    ResumeError,
    StartedRun,
    TrainingInterrupted,
    started_run,
)
from .run_log import MetricsLog, read_metrics_lines, write_run_config
from .finetune_data import (
    Augment,
    FinetuneDataError,
    FinetuneDataset,
    collate,
    collect_images,
    read_annotations,
    resize_ratio,
)
from .losses import point_losses, sample_mask_points
from .schedule import build_optimizer

LAST = "last.pth"
FINETUNED = "clip2sam_finetuned.pth"
FPN_PREFIX = "fpn_neck."
HEAD_PREFIX = "mask_decoder."


class FinetuneError(ValueError):
    """A finetuning run that cannot start or go on (bad input, mismatched checkpoint)."""


class FinetuneInterrupted(TrainingInterrupted):
    """Ctrl-C during finetuning: `last.pth` was saved at `step` (by rank 0)."""


@dataclass
class FinetuneConfig:
    """Everything a run needs. `batch_size` is the global batch (split over the processes);
    `milestones` are epochs at which the lr is multiplied by 0.1; `max_iters` caps the run (and
    the schedule). `weights`: component → file loaded strictly into the model before training
    (`sam2clip`, `prompt_encoder`, optionally `clip2sam` to start from); `clip_pretrained`:
    open_clip's `pretrained=` (None: random CLIP, tests); `clip_tag`: identity of those CLIP
    weights for the text-embedding cache (None: no cache)."""

    ann: Path
    images: Path
    out: Path
    dataset: str = "coco"
    model: str = "ovsam-rn50x16-coco"
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 500
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    grad_clip: float = 0.01
    prompts_per_image: int = 40
    num_points: Optional[int] = None  # None: 12,544 = 112² at 1024² inputs, scaled with the input area
    oversample: float = 3.0
    importance: float = 0.75
    ce_weight: float = 2.0
    bg_weight: float = 0.1
    bce_weight: float = 5.0
    dice_weight: float = 5.0
    resize_ratio: Optional[tuple[float, float]] = None  # None: (0.9, 2.0) COCO, (0.1, 2.0) LVIS
    flip: float = 0.5
    max_iters: Optional[int] = None
    save_every: int = 1000
    workers: int = 4
    device: str = "cpu"
    resume: bool = False
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (losses in float32)
    weights: Mapping[str, Path] = field(default_factory=dict)
    sam_decoder: Optional[Path] = None  # SAM's mask decoder (`registry.sam_decoder_weight`) to start from
    clip_pretrained: Optional[str] = None
    clip_cache_dir: Optional[Path] = None
    clip_tag: Optional[str] = None
    cache_dir: Optional[Path] = None  # text-embedding cache root
    val_ann: Optional[Path] = None  # held-out COCO/LVIS JSON: the prompt protocol while training
    val_images: Optional[Path] = None
    eval_every: int = 500  # with val_ann: eval every N iterations (0: only at the start and end)
    cache_features: bool = False  # keep each image's frozen features (needs one scale ≤ 1); see FrozenFeatures


@dataclass
class FinetuneResult:
    step: int  # iterations done in total (over all runs)
    total: int  # the schedule's horizon
    epoch: int
    images: int = 0  # training images (with at least one usable instance)
    losses: list[dict] = field(default_factory=list)  # this run's per-iteration loss terms (mean over ranks)
    evals: list[dict] = field(default_factory=list)  # every eval record of the run's log, step 0 first
    last: Optional[Path] = None
    finetuned: Optional[Path] = None


def lr_factor(step: int, warmup: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Multiplier of the base lr at iteration `step` (0-based): (step + 1) / warmup during the
    warm-up, times gamma per milestone iteration already reached."""
    warm = (step + 1) / warmup if step < warmup else 1.0
    return warm * gamma ** sum(step >= m for m in milestones)


def official_state(fpn: CLIP2SAMFPN, head: OVSAMHead) -> dict[str, torch.Tensor]:
    """FPN + head in the released `clip2sam_*_rn50x16.pth` layout (`fpn_neck.*`, `mask_decoder.*`)."""
    out = {FPN_PREFIX + fpn.local_key_map(k): v.detach().cpu().clone() for k, v in fpn.state_dict().items()}
    out.update({HEAD_PREFIX + k: v.detach().cpu().clone() for k, v in head.state_dict().items()})
    return out


class CLIP2SAMTrainable(nn.Module):
    """The trainable part (FPN + head) as one module, so DDP sees a single forward.

    forward: CLIP C2..C5 and the adapter's embeddings of B images, per-image prompt encodings →
    mask logits [N, 1, S/4, S/4] and region embeddings [N, D] of all N prompts, image-major.
    """

    def __init__(self, fpn: CLIP2SAMFPN, head: OVSAMHead, roi_size: int, finest_scale: float) -> None:
        super().__init__()
        self.fpn, self.head = fpn, head
        self.roi_size, self.finest_scale = roi_size, finest_scale

    def forward(self, clip_feats: list[torch.Tensor], embeddings: torch.Tensor, image_pe: torch.Tensor,
                groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """groups: (image index, sparse [n, T, C], dense [n, C, h, w], RoI boxes [n, 4] XYXY).

        Groups whose prompts have the same number of sparse tokens (boxes and single clicks both
        have 2) are decoded in one call with each prompt's image embedding gathered: the same
        function as one call per group, with far fewer (and larger) operations."""
        fpn = self.fpn(clip_feats)
        dtype = embeddings.dtype
        masks, labels = [], []
        for run in _same_token_runs(groups):
            first = run[0][0]
            if all(g[0] == first for g in run):  # one image: broadcast, not copied per prompt
                image = embeddings[first : first + 1]
            else:
                index = torch.cat([torch.full((g[1].shape[0],), g[0], dtype=torch.long) for g in run])
                image = embeddings[index.to(embeddings.device)]
            sparse = torch.cat([g[1] for g in run]).to(dtype)
            dense = torch.cat([g[2] for g in run]).to(dtype)
            m, label = self.head.decode(image, image_pe.to(dtype), sparse, dense)
            masks.append(m)
            labels.append(label)
        rois = torch.cat([torch.cat([boxes.new_full((boxes.shape[0], 1), float(b)), boxes.float()], dim=1)
                          for b, _, _, boxes in groups])
        roi_feats = multilevel_roi_align(fpn, rois, self.roi_size, finest_scale=self.finest_scale)
        region = self.head.region_embed(roi_feats.to(fpn[0].dtype), torch.cat(labels))
        # An FPN level that no RoI picked gets no gradient, which DDP reports as an unused parameter
        # on the next step; a zero-weighted term keeps every level in the graph (cheaper than
        # find_unused_parameters=True).
        region = region + 0.0 * sum(f.float().mean() for f in fpn)
        return torch.cat(masks), region


def _same_token_runs(groups: list) -> list[list]:
    """Consecutive prompt groups split where the number of sparse tokens changes (order kept)."""
    runs: list[list] = []
    for g in groups:
        if runs and runs[-1][-1][1].shape[1] == g[1].shape[1]:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def num_points(cfg: FinetuneConfig, image_size: int) -> int:
    """Mask-loss points per prompt: `cfg.num_points`, or 12,544 (112²) scaled with the input area."""
    if cfg.num_points is not None:
        return cfg.num_points
    return round(112 * image_size / 1024) ** 2


def point_seed(seed: int, step: int, index: int, kind: int) -> int:
    """The mask-point seed of one image's box (kind 0) or point (kind 1) prompts at `step`."""
    return int(np.random.SeedSequence([seed, step, index, kind]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_val_images(gt: dict, ann: Path, images: Path) -> None:
    """`FinetuneError` when an image the evaluation will read (one with a non-crowd instance) is
    missing: found before the run starts, not at its first evaluation. Every rank checks every
    image, so that all of them stop."""
    from ..eval.prompt import image_path

    used = {int(a["image_id"]) for a in gt["annotations"] if not a.get("iscrowd", 0)}
    missing = []
    for im in gt["images"]:
        if int(im["id"]) in used:
            try:
                image_path(images, im)
            except (OSError, ValueError):
                missing.append(str(im.get("file_name") or im.get("coco_url") or im.get("id")))
    if missing:
        raise FinetuneError(f"--val-ann {ann}: {len(missing)} annotated image(s) missing under {images}, "
                            f"e.g. {missing[0]} (their folder is --val-images, default --images)")


class PromptValidation:
    """The prompt protocol of `ovsam eval` (GT box per instance; mIoU and top-1 accuracy, base
    and novel) on a held-out set, run on the model being trained: the same predictor settings
    as `ovsam eval --protocol prompt`, so a final figure here equals that command's on the saved
    file. Each rank evaluates every world-th image; the means are combined by instance counts."""

    def __init__(self, model: OVSAM, spec, ann: Path, images: Path, dataset: str, device: torch.device,
                 cache_dir: Optional[Path], rank: int, world: int) -> None:
        from ..eval.detector import load_ground_truth

        self.model, self.spec, self.images, self.dataset = model, spec, Path(images), dataset
        self.device, self.cache_dir, self.world = device, cache_dir, world
        gt = load_ground_truth(ann)
        _check_val_images(gt, Path(ann), self.images)
        ids = sorted(int(im["id"]) for im in gt["images"])[rank::world]
        mine = set(ids)
        self.gt = {**gt, "images": [im for im in gt["images"] if int(im["id"]) in mine],
                   "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in mine]}
        self.vocab = vocabulary_from_categories(gt["categories"], name=f"--val-ann {Path(ann).name}")
        self._predictor = None

    def predictor(self):
        from ..predictor import OVSAMPredictor

        if self._predictor is None:
            embeds = text_embeddings(self.vocab, self.model.trunk, cache_dir=self.cache_dir)
            seen = seen_mask(self.vocab, load_vocabulary(self.spec.train_vocabulary))
            self._predictor = OVSAMPredictor(self.model, self.vocab, embeds, seen, device=self.device,
                                             mask_postprocess=PUBLISHED_MASK_POSTPROCESS)
        self._predictor.model.eval()
        return self._predictor

    @torch.no_grad()
    def figures(self) -> dict[str, Optional[float]]:
        from ..eval.prompt import evaluate_prompts

        r = evaluate_prompts(self.predictor(), self.gt, self.images, prompt="box", dataset=self.dataset,
                             progress=False)
        groups = {"": (r.num_instances, r.miou, r.acc), "_base": (r.num_base, r.miou_base, r.acc_base),
                  "_novel": (r.num_novel, r.miou_novel, r.acc_novel)}
        packed = torch.tensor([x for n, iou, acc in groups.values() for x in (n, (iou or 0.0) * n, (acc or 0.0) * n)],
                              dtype=torch.float64)
        if self.world > 1:
            if dist.get_backend() == "nccl":
                packed = packed.to(self.device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        out: dict[str, Optional[float]] = {}
        for i, suffix in enumerate(groups):
            n, iou, acc = (float(v) for v in packed[3 * i : 3 * i + 3])
            out[f"iou{suffix}"] = iou / n if n else None
            out[f"acc{suffix}"] = acc / n if n else None
        return out


class FrozenFeatures:
    """The frozen CLIP trunk's C2..C5 and the adapter's embeddings of a batch's images.

    cached: keep each (dataset index, augmentation draw)'s features on the device and compute
    only the images not seen with that draw before. The same features (the trunk and adapter are
    frozen and in eval mode, and each image's features do not depend on the others in the batch;
    only float rounding may differ with the batch's size), and useful when the draws repeat: one
    scale ≤ 1, so no crop (with flips, two draws per image). Memory per draw: the features (about
    1 MB at tiny-256, 100 MB at ovsam-rn50x16's 1024²) and the dataset's memo of the pixels
    (0.8 MB, 12 MB)."""

    def __init__(self, model: OVSAM, device: torch.device, cached: bool = False, draws: int = 0) -> None:
        """draws: how many (image, draw) pairs the run can meet (checked against free memory)."""
        self.model, self.device, self.draws = model, device, draws
        self.cache: Optional[dict[tuple, tuple[list[torch.Tensor], torch.Tensor]]] = {} if cached else None

    def compute(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        clip_feats = self.model.trunk(pixels.to(self.device, non_blocking=True))
        return clip_feats, self.model.adapter(clip_feats)

    def __call__(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.cache is None:
            return self.compute(batch["pixels"])
        keys = list(zip((int(i) for i in batch["index"]), batch["augment"]))
        missing = [b for b, key in enumerate(keys) if key not in self.cache]
        if missing:
            clip_feats, embeddings = self.compute(batch["pixels"][missing])
            first = not self.cache
            for j, b in enumerate(missing):
                self.cache[keys[b]] = ([f[j : j + 1].clone() for f in clip_feats], embeddings[j : j + 1].clone())
            if first:
                self._check_memory(batch["pixels"][0])
        entries = [self.cache[key] for key in keys]
        levels = len(entries[0][0])
        return ([torch.cat([e[0][level] for e in entries]) for level in range(levels)],
                torch.cat([e[1] for e in entries]))

    def _check_memory(self, pixels: torch.Tensor) -> None:
        """Refuse (FinetuneError) a cache (with the dataset's memo of one image's `pixels` per
        draw) that would take over half the free memory of the device."""
        feats, emb = next(iter(self.cache.values()))
        need = self.draws * sum(t.numel() * t.element_size() for t in [*feats, emb, pixels])
        free = free_memory(self.device)
        if free is not None and need > free / 2:
            raise FinetuneError(f"--cache-features would keep about {human_size(need)} of frozen features "
                                f"({self.draws} image draws) with {human_size(free)} free on {self.device}: "
                                "leave it out for this dataset")


class _Trainer(ResumableTrainer):
    """Trains the FPN and head (`CLIP2SAMTrainable`); CLIP, adapter and prompt encoder run under no_grad."""

    official_name = FINETUNED
    config_exclude = ("weights",)
    interrupted = FinetuneInterrupted

    def __init__(self, cfg: FinetuneConfig, model: OVSAM, class_embeds: torch.Tensor, device: torch.device,
                 rank: int, world: int, iters_per_epoch: int, total: int,
                 val: Optional[PromptValidation] = None, draws: int = 0) -> None:
        """draws: the (image, augmentation) pairs this rank can meet (with `cfg.cache_features`)."""
        self.model, self.val = model, val
        self.frozen = FrozenFeatures(model, device, cached=cfg.cache_features, draws=draws)
        self.num_points = num_points(cfg, model.cfg.image_size)
        self.class_embeds = add_background(class_embeds).to(device)
        self.saved_modules = {"fpn": model.fpn, "head": model.head}
        trainable = CLIP2SAMTrainable(model.fpn, model.head, model.cfg.roi_size, model.cfg.finest_scale)
        optimizer = build_optimizer(trainable, cfg.lr, cfg.weight_decay, cfg.betas)
        milestones = [m * iters_per_epoch for m in cfg.milestones]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_iters, milestones, cfg.gamma))
        self.setup(cfg, device, rank, world, iters_per_epoch, total, trainable, optimizer, scheduler)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch (float32) and their sum under "loss"."""
        cfg, model = self.cfg, self.model
        with self.autocast():
            with torch.no_grad():
                clip_feats, embeddings = self.frozen(batch)
                groups, targets, labels, kinds = [], [], [], []
                image_pe = None
                for b in range(embeddings.shape[0]):
                    is_box = batch["is_box"][b].to(self.device)
                    boxes = batch["boxes"][b].to(self.device)
                    points = batch["points"][b].to(self.device)
                    inst = batch["instance"][b].to(self.device)
                    masks = batch["masks"][b].to(self.device)
                    cls = batch["labels"][b].to(self.device)
                    for sel, use_box in ((is_box, True), (~is_box, False)):
                        if not sel.any():
                            continue
                        if use_box:
                            sparse, dense, image_pe = model.encode_prompts(boxes[sel], None, None)
                        else:
                            pts = points[sel]
                            sparse, dense, image_pe = model.encode_prompts(
                                None, pts, torch.ones(pts.shape[:2], dtype=torch.long, device=self.device))
                        groups.append((b, sparse, dense, boxes[sel]))
                        kinds.append(0 if use_box else 1)
                        targets.append(masks[inst[sel]])
                        labels.append(cls[inst[sel]])
            mask_logits, region = self.wrapped(clip_feats, embeddings, image_pe, groups)
        # Mask points drawn per image from (seed, step, dataset index): resumable, and the same
        # whichever process a batch image lands on, so that N processes train as one.
        preds, point_targets, start = [], [], 0
        for (b, *_), kind, target in zip(groups, kinds, targets):
            n = target.shape[0]
            gen = torch.Generator(device=self.device)
            gen.manual_seed(point_seed(cfg.seed, self.step, int(batch["index"][b]), kind))
            pred, tgt = sample_mask_points(mask_logits[start : start + n].float(), target[:, None], self.num_points,
                                           cfg.oversample, cfg.importance, generator=gen)
            preds.append(pred)
            point_targets.append(tgt)
            start += n
        bce, dice = point_losses(torch.cat(preds), torch.cat(point_targets))
        logits = class_logits(region.float(), self.class_embeds)
        ce = classification_loss(logits, torch.cat(labels), cfg.bg_weight)
        terms = {"ce": cfg.ce_weight * ce, "bce": cfg.bce_weight * bce, "dice": cfg.dice_weight * dice}
        terms["loss"] = terms["ce"] + terms["bce"] + terms["dice"]
        return terms

    def train_step(self, batch: dict) -> dict[str, float]:
        terms = self.losses(batch)
        norm = self.optimizer_step(terms["loss"])
        return {**{k: v.item() for k, v in terms.items()}, "grad_norm": norm}

    def evaluate(self) -> Optional[dict[str, Optional[float]]]:
        if self.val is None:
            return None
        figures = self.val.figures()
        self.model.eval()
        self.trainable.train()
        return figures

    def official_state(self) -> dict[str, torch.Tensor]:
        return official_state(self.model.fpn, self.model.head)


def _check(cfg: FinetuneConfig) -> None:
    if cfg.dataset not in ("coco", "lvis"):
        raise FinetuneError(f"--dataset must be coco or lvis, not {cfg.dataset!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.prompts_per_image < 2:
        raise FinetuneError("--epochs and --batch-size must be at least 1, --prompts-per-image at least 2")
    if cfg.max_iters is not None and cfg.max_iters < 1:
        raise FinetuneError("--max-iters must be at least 1")
    if not Path(cfg.ann).is_file():
        raise FinetuneError(f"annotations not found: {cfg.ann}")
    if not Path(cfg.images).is_dir():
        raise FinetuneError(f"images folder not found: {cfg.images}")
    if cfg.val_images is not None and cfg.val_ann is None:
        raise FinetuneError("--val-images needs --val-ann (the held-out annotations)")
    if cfg.val_ann is not None and not Path(cfg.val_ann).is_file():
        raise FinetuneError(f"--val-ann {cfg.val_ann}: no such file")
    if cfg.val_images is not None and not Path(cfg.val_images).is_dir():
        raise FinetuneError(f"--val-images {cfg.val_images}: no such folder")
    if cfg.eval_every < 0:
        raise FinetuneError("--eval-every must be 0 or more")
    ratio = resize_ratio(cfg.dataset, cfg.resize_ratio)
    if cfg.cache_features and not ratio[0] == ratio[1] <= 1:
        raise FinetuneError(f"--cache-features needs one scale of at most 1 (--resize-min equal to --resize-max, "
                            f"≤ 1; now {ratio[0]:g} and {ratio[1]:g}): with a random resize or crop no image is "
                            "seen twice the same")


def build_finetune_model(cfg: FinetuneConfig) -> OVSAM:
    """The model with `cfg.weights` loaded, frozen for finetuning. Its random parts are built as
    every ovsam command builds them (seed 0, the same on every rank), so that the step-0 model is
    `ovsam eval --model NAME`'s, and a finetuned file meets the same frozen parts there."""
    spec = resolve_spec(cfg.model)
    if spec.kind != "ovsam":
        raise FinetuneError(f"{cfg.model} is a baseline; finetuning needs an OVSAM model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(spec, weights=dict(cfg.weights), random_weights=cfg.clip_pretrained is None,
                            clip_pretrained=cfg.clip_pretrained, clip_cache_dir=cfg.clip_cache_dir)
    if cfg.sam_decoder is not None and "clip2sam" not in cfg.weights:
        init_decoder_from_sam(model, cfg.sam_decoder)
    model.trunk.weights_tag = cfg.clip_tag
    model.freeze_for_finetune()
    return model


def init_decoder_from_sam(model: OVSAM, path: Path) -> None:
    """Start the one-token decoder from SAM's mask decoder (its single-mask token 0), as CLIP2SAM
    does; the label token/MLP, roi_conv and FPN keep their random init."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise FinetuneError(f"{path}: expected a SAM checkpoint, found a bare tensor")
    decoder = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
    if not decoder:
        raise FinetuneError(f"{path}: no mask_decoder.* keys (not a SAM checkpoint)")
    try:
        model.head.mask_decoder.load_state_dict(one_token_state_from_sam(decoder), strict=True)
    except (RuntimeError, KeyError) as e:
        raise FinetuneError(f"{path}: SAM's decoder does not fit {type(model.head).__name__} "
                            f"({str(e).splitlines()[0]})") from None


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Finetune `cfg.model`'s FPN and head; see the module docstring.

    Raises `FinetuneError` on bad input and `FinetuneInterrupted` after saving on Ctrl-C.
    """
    _check(cfg)
    with started_run(cfg, _Trainer, FinetuneError) as run:
        return _run_finetune(cfg, progress, run)


def _run_finetune(cfg: FinetuneConfig, progress: bool, run: StartedRun) -> FinetuneResult:
    """`run_finetune` after its checks, with the output folder locked."""
    rank, world, per_rank, out = run.rank, run.world, run.per_rank, run.out
    try:
        gt, vocab, base_ids = read_annotations(cfg.ann, cfg.dataset)
    except FinetuneDataError as e:
        raise FinetuneError(str(e)) from e
    except ValueError as e:  # a category list without the COCO/LVIS split
        raise FinetuneError(f"{cfg.ann}: {e}") from e
    spec = resolve_spec(cfg.model)
    size, pre = spec.config.image_size, spec.preprocessing
    images = collect_images(gt, cfg.images, base_ids, size)
    if not images:
        raise FinetuneError(f"{cfg.ann}: no image has a usable {cfg.dataset} base-class instance")
    missing = [im.file for im in images if not im.file.is_file()]
    if missing:
        raise FinetuneError(f"{len(missing)} annotated image(s) missing under {cfg.images}, e.g. {missing[0].name}")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    model = build_finetune_model(cfg).to(device)
    class_embeds = text_embeddings(vocab, model.trunk, cache_dir=cfg.cache_dir)
    aug = Augment(flip=cfg.flip, ratio=resize_ratio(cfg.dataset, cfg.resize_ratio))
    dataset = FinetuneDataset(images, vocab, size, pre.mean, pre.std, aug, cfg.prompts_per_image, cfg.seed,
                              memo=cfg.cache_features)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
    ipe = math.ceil(len(sampler) / per_rank)
    total = cfg.epochs * ipe if cfg.max_iters is None else min(cfg.epochs * ipe, cfg.max_iters)
    val = None
    if cfg.val_ann is not None:
        val = PromptValidation(model, spec, cfg.val_ann, cfg.val_images or cfg.images, cfg.dataset, device,
                               cfg.cache_dir, rank, world)
    # each rank meets every image in time (the sampler reshuffles them over the ranks each epoch)
    draws = min(len(dataset), total * per_rank) * (2 if 0 < cfg.flip < 1 else 1)
    trainer = _Trainer(cfg, model, class_embeds, device, rank, world, ipe, total, val, draws=draws)
    if cfg.resume:
        try:
            trainer.resume_from(run.last_path, run.state)
        except ResumeError as e:
            raise FinetuneError(str(e)) from None
    model.eval()
    trainer.trainable.train()
    result = FinetuneResult(step=0, total=total, epoch=0, images=len(images))
    if rank == 0:
        write_run_config(out, "finetune", cfg, weights={**cfg.weights, "sam_decoder": cfg.sam_decoder},
                         world_size=world)
    log = MetricsLog(out, enabled=rank == 0, resume_step=trainer.step if cfg.resume else None)
    try:
        records = trainer.fit(dataset, sampler, per_rank, desc="finetune", progress=progress, collate_fn=collate,
                              log=log)
    except FinetuneDataError as e:
        raise FinetuneError(str(e)) from e
    keys = ("loss", "ce", "bce", "dice")
    result.losses = [{k: r[k] for k in keys} for r in records]
    result.evals = [r for r in (read_metrics_lines(log.path) if rank == 0 else records) if "eval" in r]
    result.last, result.finetuned = out / LAST, out / FINETUNED
    result.step, result.epoch = trainer.step, trainer.step // ipe
    return result
