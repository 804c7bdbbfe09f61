"""SAM2CLIP distillation (spec §6): frozen CLIP trunk + adapter (student) regress SAM's image
embedding (teacher) with a per-pixel MSE.

One process on CPU or one GPU, or several under torchrun (DistributedDataParallel on the
adapter, DistributedSampler; only rank 0 writes). The teacher runs once per image into a
`TeacherCache`; training then reads the cached fp16 embeddings.

Outputs in `out`: `last.pth` (adapter, optimizer, scheduler, step, epoch, RNG states: what
`resume` continues from) and `sam2clip_distilled.pth`, the adapter in the released layout
(`neck_student.<key>`), loadable wherever `sam2clip_vith_rn50x16.pth` is.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..builder import build_model, resolve_spec
from ..checkpoint import load_weight_file
from ..io.loader import read_rgb
from ..modeling.ovsam import OVSAM
from ..modeling.sam2clip import SAM2CLIPAdapter
from ..registry import SAM2CLIP
from ..transforms import prepare_image
from .common import (
    ResumableTrainer,
    ResumeError,
    StartedRun,
    TrainingInterrupted,
    barrier,
    started_run,
)
from .run_log import MetricsLog, read_metrics_lines, write_run_config
from .schedule import build_optimizer, build_scheduler
from .teacher_cache import TeacherCache, build_teacher, fill_cache, teacher_identity

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAST = "last.pth"
DISTILLED = "sam2clip_distilled.pth"
OFFICIAL_PREFIX = "neck_student."


class DistillError(ValueError):
    """A distillation run that cannot start or go on (bad input, mismatched checkpoint)."""


class DistillInterrupted(TrainingInterrupted):
    """Ctrl-C during distillation: `last.pth` was saved at `step` (by rank 0)."""


@dataclass
class DistillConfig:
    """Everything a run needs. `batch_size` is the global batch (split over the processes).
    `max_iters` caps the run (smoke tests) and is then the schedule's horizon as well.
    `teacher_weights`: SAM ViT-H checkpoint (teacher "vit_h"); `adapter_init`: a SAM2CLIP file
    in the released layout to start from; `clip_pretrained`: open_clip's `pretrained=` for the
    trunk (None: random CLIP, tests)."""

    images: Path
    out: Path
    model: str = "ovsam-rn50x16-coco"
    teacher: str = "vit_h"
    teacher_cache: Optional[Path] = None
    epochs: int = 24
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 5.0
    warmup_iters: int = 500
    min_lr_ratio: float = 0.01
    max_iters: Optional[int] = None
    save_every: int = 1000
    workers: int = 4
    device: str = "cpu"
    resume: bool = False
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (the loss stays float32)
    teacher_weights: Optional[Path] = None
    adapter_init: Optional[Path] = None
    clip_pretrained: Optional[str] = None
    clip_cache_dir: Optional[Path] = None
    teacher_batch: int = 4
    val_images: Optional[Path] = None  # held-out images: MSE against the teacher while training
    eval_every: int = 500  # with val_images: eval every N iterations (0: only at the start and end)


@dataclass
class DistillResult:
    step: int  # iterations done in total (over all runs)
    total: int  # the schedule's horizon
    epoch: int
    losses: list[float] = field(default_factory=list)  # this run's per-iteration losses (mean over ranks)
    records: list[dict] = field(default_factory=list)  # this run's metrics records (metrics.jsonl)
    evals: list[dict] = field(default_factory=list)  # every eval record of the run's log, step 0 first
    teacher_computed: int = 0  # embeddings computed by the teacher in this run (this rank)
    last: Optional[Path] = None
    distilled: Optional[Path] = None
    notes: list[str] = field(default_factory=list)


def find_images(root: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png under `root` (recursive, case-insensitive suffix), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"images folder not found: {root}")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise DistillError(f"no .jpg/.jpeg/.png images under {root}")
    return found


def load_pixels(path: Path, size: int, mean, std) -> torch.Tensor:
    """An image file → [3, size, size] normalised, zero-padded (the model frame)."""
    try:
        image = read_rgb(path)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read image {path}: {e}") from e
    return prepare_image(image, size, mean, std).pixels


class DistillImages(Dataset):
    """(pixels [3, S, S], teacher embedding [C, g, g] float32) per image."""

    def __init__(self, paths: list[Path], cache: TeacherCache, size: int, mean, std) -> None:
        self.paths, self.cache, self.size, self.mean, self.std = paths, cache, size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[i]
        return load_pixels(path, self.size, self.mean, self.std), self.cache.load(path)


def official_state(adapter: SAM2CLIPAdapter) -> dict[str, torch.Tensor]:
    """The adapter's state dict in the released `sam2clip_vith_rn50x16.pth` layout."""
    return {OFFICIAL_PREFIX + k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}


def copy_pos_embed(adapter: SAM2CLIPAdapter, teacher_pos: Optional[torch.Tensor]) -> bool:
    """Copy the teacher's absolute position embedding into the adapter when shapes match."""
    if teacher_pos is None or teacher_pos.shape != adapter.pos_embed.shape:
        return False
    with torch.no_grad():
        adapter.pos_embed.copy_(teacher_pos.to(adapter.pos_embed))
    return True


class _Trainer(ResumableTrainer):
    """Trains `model.adapter`; the frozen trunk runs under no_grad."""

    official_name = DISTILLED
    interrupted = DistillInterrupted

    def __init__(self, cfg: DistillConfig, model: OVSAM, device: torch.device, rank: int, world: int,
                 iters_per_epoch: int, total: int, val: Optional["DistillValidation"] = None) -> None:
        self.model, self.adapter, self.val = model, model.adapter, val
        self.saved_modules = {"adapter": self.adapter}
        optimizer = build_optimizer(self.adapter, cfg.lr, cfg.weight_decay, cfg.betas)
        self.setup(cfg, device, rank, world, iters_per_epoch, total, self.adapter, optimizer,
                   build_scheduler(optimizer, cfg.warmup_iters, total, cfg.min_lr_ratio))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        pixels, target = batch
        pixels = pixels.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        with self.autocast():
            with torch.no_grad():
                feats = self.model.trunk(pixels)
            pred = self.wrapped(feats)
        loss = F.mse_loss(pred.float(), target)
        norm = self.optimizer_step(loss)
        value = loss.item()
        return {"loss": value, "mse": value, "grad_norm": norm}

    def evaluate(self) -> Optional[dict[str, float]]:
        if self.val is None:
            return None
        self.adapter.eval()
        mse = self.val.mse(lambda pixels: self.adapter(self.model.trunk(pixels)), self.autocast)
        self.adapter.train()
        if "mse_untrained" not in self.extra:  # the first eval is the untrained student's (step 0)
            self.extra["mse_untrained"] = mse
        return {"mse": mse, "mse_untrained": self.extra["mse_untrained"], "mse_constant": self.val.constant_mse}

    def official_state(self) -> dict[str, torch.Tensor]:
        return official_state(self.adapter)


class DistillValidation:
    """Held-out images and their teacher embeddings (this rank's share), and the constant
    predictor's figure: the teacher's mean embedding over the training images."""

    def __init__(self, paths: list[Path], cache: TeacherCache, train_paths: list[Path], size: int, mean, std,
                 device: torch.device, rank: int, world: int, batch_size: int) -> None:
        self.data = DistillImages(paths[rank::world], cache, size, mean, std)
        self.device, self.world, self.batch_size = device, world, batch_size
        total = None
        for p in train_paths:  # streamed: one embedding in memory at a time
            e = cache.load(p).double()
            total = e if total is None else total.add_(e)
        self.mean_embedding = (total / len(train_paths)).float()
        self.constant_mse = self._reduce(*self._constant_sums())

    def _batches(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def _constant_sums(self) -> tuple[float, int]:
        err, count = 0.0, 0
        for _, target in self._batches():
            err += float(((self.mean_embedding[None] - target) ** 2).double().sum())
            count += target.numel()
        return err, count

    def _reduce(self, err: float, count: int) -> float:
        if self.world > 1:
            packed = torch.tensor([err, float(count)], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                packed = packed.to(self.device)
            dist.all_reduce(packed)
            err, count = float(packed[0]), int(packed[1])
        return err / max(count, 1)

    @torch.no_grad()
    def mse(self, student, autocast) -> float:
        """Per-pixel MSE of `student(pixels)` against the teacher over the held-out images."""
        err, count = 0.0, 0
        for pixels, target in self._batches():
            with autocast():
                pred = student(pixels.to(self.device))
            err += float(((pred.float().cpu() - target) ** 2).double().sum())
            count += target.numel()
        return self._reduce(err, count)


def run_distill(cfg: DistillConfig, progress: bool = True) -> DistillResult:
    """Distill the teacher into `cfg.model`'s adapter; see the module docstring.

    Raises `DistillError` on bad input and `DistillInterrupted` after saving on Ctrl-C.
    """
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise DistillError("--epochs and --batch-size must be at least 1")
    if cfg.max_iters is not None and cfg.max_iters < 1:
        raise DistillError("--max-iters must be at least 1")
    with started_run(cfg, _Trainer, DistillError) as run:
        return _run_distill(cfg, progress, run)


def _run_distill(cfg: DistillConfig, progress: bool, run: StartedRun) -> DistillResult:
    """`run_distill` after its checks, with the output folder locked."""
    rank, world, per_rank, out = run.rank, run.world, run.per_rank, run.out
    images = find_images(cfg.images)
    val_images = find_images(cfg.val_images) if cfg.val_images is not None else []
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    spec = resolve_spec(cfg.model)
    if spec.kind != "ovsam":
        raise DistillError(f"{cfg.model} is a baseline; distillation needs an OVSAM model")
    pre = spec.preprocessing
    size = spec.config.image_size
    result = DistillResult(step=0, total=0, epoch=0)
    shared = {p.resolve() for p in images} & {p.resolve() for p in val_images}
    if shared:
        result.notes.append(f"{len(shared)} --val-images image(s) are also training images: "
                            "the eval is not on held-out images")

    # student: the random parts as every ovsam command builds them (seed 0), so that the
    # distilled adapter works with the same CLIP trunk in `ovsam label --checkpoint sam2clip=...`
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(spec, random_weights=cfg.clip_pretrained is None, clip_pretrained=cfg.clip_pretrained,
                            clip_cache_dir=cfg.clip_cache_dir)
    if cfg.adapter_init is not None:
        load_weight_file(model, SAM2CLIP, cfg.adapter_init)
    model.trunk.lock()
    model.prompt_encoder.requires_grad_(False)
    model.head.requires_grad_(False)
    model.fpn.requires_grad_(False)
    model.to(device)
    adapter = model.adapter
    grid = adapter.pos_embed.shape[1]
    out_chans = adapter.neck[2].out_channels  # conv 3×3 of SAM's neck layout

    # teacher → cache (only the images without an entry; the teacher is not even built otherwise)
    if cfg.teacher == "tiny":
        teacher_args = {"tiny_dims": (adapter.pos_embed.shape[-1], spec.config.prompt_dim)}
    else:
        teacher_args = {"weights": cfg.teacher_weights}
    cache_root = Path(cfg.teacher_cache) if cfg.teacher_cache is not None else out / "teacher_cache"
    try:
        identity = teacher_identity(cfg.teacher, **teacher_args)
    except ValueError as e:
        raise DistillError(str(e)) from e
    teacher_pos = None
    cache = TeacherCache(cache_root, identity, size)
    every = images + [p for p in val_images if p.resolve() not in shared]
    need_teacher = (not cfg.resume) or any(not cache.has(p) for p in every)
    if need_teacher:
        teacher, _ = build_teacher(cfg.teacher, image_size=size, **teacher_args)
        teacher.to(device)
        teacher_pos = teacher.pos_embed.detach().cpu() if teacher.pos_embed is not None else None
        bar = tqdm(total=sum(not cache.has(p) for p in every[rank::world]), desc="teacher", unit="img", file=sys.stderr,
                   disable=not progress or rank != 0, leave=False)
        result.teacher_computed = fill_cache(cache, every, teacher,
                                             partial(load_pixels, size=size, mean=pre.mean, std=pre.std),
                                             device=device, batch_size=cfg.teacher_batch, rank=rank,
                                             world_size=world, progress=bar.update, workers=cfg.workers)
        bar.close()
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    barrier(world)
    probe = cache.load(images[0])
    if tuple(probe.shape) != (out_chans, grid, grid):
        raise DistillError(f"teacher embeddings are {list(probe.shape)} but {cfg.model}'s adapter gives "
                           f"[{out_chans}, {grid}, {grid}] (choose a matching --teacher)")

    if not cfg.resume:
        if copy_pos_embed(adapter, teacher_pos):
            result.notes.append("adapter position embedding copied from the teacher (kept fixed)")
        else:
            result.notes.append("teacher position embedding has another shape: adapter keeps its own")
    adapter.pos_embed.requires_grad_(False)  # a buffer: never in the optimizer

    dataset = DistillImages(images, cache, size, pre.mean, pre.std)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
    ipe = math.ceil(len(sampler) / per_rank)
    total = cfg.epochs * ipe if cfg.max_iters is None else min(cfg.epochs * ipe, cfg.max_iters)
    val = (DistillValidation(val_images, cache, images, size, pre.mean, pre.std, device, rank, world, per_rank)
           if val_images else None)
    trainer = _Trainer(cfg, model, device, rank, world, ipe, total, val)
    if cfg.resume:
        try:
            trainer.resume_from(run.last_path, run.state)
        except ResumeError as e:
            raise DistillError(str(e)) from None
    model.adapter.train()
    result.total = total
    if rank == 0:
        write_run_config(out, "distill", cfg, weights={"sam": cfg.teacher_weights, "sam2clip": cfg.adapter_init},
                         world_size=world)
    log = MetricsLog(out, enabled=rank == 0, resume_step=trainer.step if cfg.resume else None)
    result.records = trainer.fit(dataset, sampler, per_rank, desc="distill", progress=progress, log=log)
    result.losses = [r["loss"] for r in result.records]
    result.evals = [r for r in (read_metrics_lines(log.path) if rank == 0 else result.records) if "eval" in r]
    result.last, result.distilled = out / LAST, out / DISTILLED
    result.step, result.epoch = trainer.step, trainer.step // ipe
    return result
