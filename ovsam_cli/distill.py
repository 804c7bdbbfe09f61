"""`ovsam distill`: train a SAM2CLIP adapter by distilling SAM ViT-H into frozen CLIP (spec §6).

Single process (CPU or one GPU) or `torchrun --nproc_per_node N -m ovsam_cli distill ...`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ovsam_cli.common import (
    AmpOpt,
    BatchSizeOpt,
    CacheDirOpt,
    CheckpointOpt,
    CliError,
    ClipWeightsOpt,
    DeviceOpt,
    EpochsOpt,
    EvalEveryOpt,
    GradClipOpt,
    LrOpt,
    MaxItersOpt,
    OfflineOpt,
    PlotOpt,
    QuietOpt,
    ResumeOpt,
    SaveEveryOpt,
    SeedOpt,
    WorkersOpt,
    exit_interrupted,
    info,
    report_training,
    resolve_device,
    user_errors,
    weight_options,
)


class Teacher(str, Enum):
    """Which SAM image encoder teaches."""

    vit_h = "vit_h"
    tiny = "tiny"


def distill(
    images: Annotated[Path, typer.Option("--images", help="Folder of training images (.jpg/.jpeg/.png, searched recursively).")],
    out: Annotated[Path, typer.Option("--out", file_okay=False,
                                      help="Output folder: last.pth (for --resume), sam2clip_distilled.pth (the adapter in the released layout), metrics.jsonl (one line per iteration), config.json (options, versions, weights' sha256, commit), teacher_cache/.")],
    model: Annotated[str, typer.Option("--model", help="Student: an OVSAM registry name (its CLIP trunk + adapter); tiny for smoke tests, tiny-256 for small runs that learn on a CPU.")] = "ovsam-rn50x16-coco",
    teacher: Annotated[Teacher, typer.Option("--teacher", help="Teacher: vit_h (SAM ViT-H, weights fetched or --checkpoint sam=PATH) or tiny (random, tests).")] = Teacher.vit_h,
    teacher_cache: Annotated[Optional[Path], typer.Option("--teacher-cache", file_okay=False,
                                                          help="Folder of cached teacher embeddings (fp16, one file per image; default OUT/teacher_cache).")] = None,
    val_images: Annotated[Optional[Path], typer.Option(
        "--val-images", file_okay=False,
        help="Held-out images: the student's MSE against the teacher on them every --eval-every iterations, with "
             "two references, the untrained student and a constant predictor (the teacher's mean embedding over "
             "the training images).")] = None,
    eval_every: EvalEveryOpt = 500,
    plot: PlotOpt = False,
    epochs: EpochsOpt = 24,
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = 1e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay (none on norms, biases, level embedding).")] = 0.05,
    warmup_iters: Annotated[int, typer.Option("--warmup-iters", min=0, help="Linear warm-up iterations, then cosine to 1% of --lr.")] = 500,
    grad_clip: GradClipOpt = 5.0,
    max_iters: MaxItersOpt = None,
    save_every: SaveEveryOpt = 1000,
    workers: WorkersOpt = 4,
    resume: ResumeOpt = False,
    seed: SeedOpt = 0,
    amp: AmpOpt = True,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    checkpoint: CheckpointOpt = None,
    clip_weights: ClipWeightsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Distill SAM ViT-H's image embeddings into a SAM2CLIP adapter on frozen CLIP (paper §3.2, spec §6).

    The teacher's embeddings are computed once per image and cached (fp16); the student is the frozen CLIP trunk plus the adapter, trained with a per-pixel MSE. Ctrl-C saves OUT/last.pth; --resume continues from it.

    --checkpoint takes sam=PATH (the teacher's SAM ViT-H checkpoint) and sam2clip=PATH (an adapter to start from). The result loads with `ovsam label --checkpoint sam2clip=OUT/sam2clip_distilled.pth`.
    """
    from ovsam_model.registry import SAM2CLIP, resolve_spec, sam_weight
    from ovsam_model.runtime import DistEnv

    with user_errors(also=(ValueError,)):  # the cheap checks, before torch is imported
        if not images.is_dir():
            raise CliError(f"--images {images}: no such folder")
        if val_images is not None and not val_images.is_dir():
            raise CliError(f"--val-images {val_images}: no such folder")
        env = DistEnv.from_env()
        quiet = quiet or env.rank != 0
        opts = weight_options(cache_dir, offline, checkpoint, clip_weights, components=("sam", "sam2clip"))
        overrides = opts["overrides"] or {}
        if teacher is not Teacher.vit_h and "sam" in overrides:
            raise CliError(f"--checkpoint sam=PATH is the vit_h teacher's; --teacher {teacher.value} takes no weights")
        spec = resolve_spec(model)
        if spec.kind != "ovsam":
            raise CliError(f"{model} is a baseline; distillation needs an OVSAM model")

    from ovsam_model.train.common import local_rank_zero_first
    from ovsam_model.train.distill import DistillConfig, DistillError, DistillInterrupted, run_distill
    from ovsam_model.weights import resolve_model_weights

    with user_errors(also=(DistillError,)):
        run_device = resolve_device(device, env.local_rank if env.distributed else None)
        # the teacher's SAM ViT-H checkpoint (fetched for --teacher vit_h), and the adapter to start
        # from (only a given --checkpoint sam2clip=PATH: the student starts random otherwise)
        extra = [sam_weight("vit_h")] + ([] if SAM2CLIP.component in spec.components else [SAM2CLIP])
        # under torchrun, local rank 0 downloads what the cache lacks while the other ranks wait
        weights = local_rank_zero_first(lambda: resolve_model_weights(
            spec, cache_dir=cache_dir, offline=opts["offline"], overrides=overrides, clip_weights=clip_weights,
            extra_files=extra, components=["sam"] if teacher is Teacher.vit_h else [], progress=not quiet,
            fetch_clip=env.distributed))
        cfg = DistillConfig(
            images=images, out=out, model=model, teacher=teacher.value, teacher_cache=teacher_cache, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, warmup_iters=warmup_iters,
            max_iters=max_iters, save_every=save_every, workers=workers, device=run_device, resume=resume,
            seed=seed, amp=amp, teacher_weights=weights.paths.get("sam"), adapter_init=weights.paths.get("sam2clip"),
            clip_pretrained=weights.clip_pretrained, clip_cache_dir=weights.clip_cache_dir,
            val_images=val_images, eval_every=eval_every,
        )
        try:
            result = run_distill(cfg, progress=not quiet)
        except DistillInterrupted as e:
            exit_interrupted(e, env.rank)
    for note in result.notes:
        info(note, quiet)
    last_loss = f", last loss {result.losses[-1]:.4g}" if result.losses else ""
    info(f"{result.step}/{result.total} iterations (epoch {result.epoch}){last_loss}; teacher embedded "
         f"{result.teacher_computed} new image(s); resume state: {result.last}", quiet)
    if env.rank == 0:
        report_training(out, result.evals, plot, quiet)
    if env.rank == 0:
        typer.echo(str(result.distilled))
