"""`ovsam finetune`: train CLIP2SAM (FPN + OVSAM head) on COCO base / LVIS frequent+common (spec §6).

Single process (CPU or one GPU) or `torchrun --nproc_per_node N -m ovsam_cli finetune ...`.
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

COMPONENTS = ("sam2clip", "prompt_encoder", "clip2sam", "sam_decoder")


class Dataset(str, Enum):
    """Which split rule selects the training classes."""

    coco = "coco"
    lvis = "lvis"


def _milestones(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CliError(f"--milestones {text!r}: expected epochs separated by commas, e.g. 8,11") from None
    if any(v < 1 for v in values):
        raise CliError(f"--milestones {text!r}: epochs start at 1")
    return values


def finetune(
    ann: Annotated[Path, typer.Option("--ann", dir_okay=False, help="COCO or LVIS instances JSON (training ground truth).")],
    images: Annotated[Path, typer.Option("--images", file_okay=False, help="Folder holding the JSON's images (file_name).")],
    out: Annotated[Path, typer.Option("--out", file_okay=False,
                                      help="Output folder: last.pth (for --resume), clip2sam_finetuned.pth (released clip2sam layout), metrics.jsonl (one line per iteration), config.json (options, versions, weights' sha256, commit).")],
    dataset: Annotated[Dataset, typer.Option("--dataset", help="coco: the 48 base classes; lvis: frequent + common (rare removed).")] = Dataset.coco,
    model: Annotated[str, typer.Option("--model", help="An OVSAM registry name (its CLIP, adapter, prompt encoder are frozen); tiny for smoke tests, tiny-256 for small runs that learn on a CPU.")] = "ovsam-rn50x16-coco",
    val_ann: Annotated[Optional[Path], typer.Option(
        "--val-ann", dir_okay=False,
        help="Held-out COCO/LVIS JSON: the prompt protocol of `ovsam eval` (a GT box per instance; mask IoU and "
             "top-1 accuracy, base and novel) every --eval-every iterations.")] = None,
    val_images: Annotated[Optional[Path], typer.Option(
        "--val-images", file_okay=False, help="Folder of --val-ann's images (default: --images).")] = None,
    eval_every: EvalEveryOpt = 500,
    plot: PlotOpt = False,
    epochs: EpochsOpt = 12,
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = 1e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay (none on 1-D parameters: norms and biases).")] = 0.05,
    warmup_iters: Annotated[int, typer.Option("--warmup-iters", min=0, help="Linear warm-up iterations.")] = 500,
    milestones: Annotated[str, typer.Option("--milestones", help="Epochs at which the lr is multiplied by 0.1 (comma-separated).")] = "8,11",
    grad_clip: GradClipOpt = 0.01,
    prompts_per_image: Annotated[int, typer.Option("--prompts-per-image", min=2, help="Prompts per image: half GT boxes, half one positive point.")] = 40,
    resize_min: Annotated[Optional[float], typer.Option("--resize-min", min=0.01, help="Smallest random resize ratio of the 1024 scale (default 0.9 COCO, 0.1 LVIS).")] = None,
    resize_max: Annotated[float, typer.Option("--resize-max", min=0.01, help="Largest random resize ratio of the 1024 scale.")] = 2.0,
    flip: Annotated[float, typer.Option("--flip", min=0.0, max=1.0, help="Probability of a horizontal flip of each training image (0 for data whose classes are not mirror-symmetric, e.g. text or left/right).")] = 0.5,
    cache_features: Annotated[bool, typer.Option("--cache-features", help="Keep each image's frozen CLIP and adapter features in memory (per flip), and with --workers 0 its resized pixels and masks too, instead of recomputing them every epoch: the same run, faster, for small datasets trained for many epochs. Needs --resize-min equal to --resize-max, at most 1; memory about 1 MB per image and flip at tiny-256, 100 MB at 1024² with ovsam-rn50x16 (refused when it would take over half the free memory).")] = False,
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
    """Finetune CLIP2SAM: the FPN and the mask/label/RoI head on frozen CLIP + SAM2CLIP (paper §3.3, spec §6).

    Losses: CE over every class of the JSON + background (2.0; background 0.1), BCE (5.0) and Dice (5.0) on 12,544 uncertainty-sampled mask points. Ctrl-C saves OUT/last.pth; --resume continues from it.

    --checkpoint takes sam2clip=PATH (the frozen adapter, e.g. from `ovsam distill`), prompt_encoder=PATH, clip2sam=PATH (FPN and head to start from) and sam_decoder=PATH (a SAM checkpoint whose mask decoder starts the one-token decoder; by default SAM ViT-H's, extracted once into the cache; the FPN, label token and roi_conv start random). The result loads with `ovsam label --checkpoint clip2sam=OUT/clip2sam_finetuned.pth`.
    """
    from ovsam_model.registry import resolve_spec, sam_decoder_weight
    from ovsam_model.runtime import DistEnv

    with user_errors(also=(ValueError,)):  # the cheap checks, before torch is imported
        if not ann.is_file():
            raise CliError(f"--ann {ann}: no such file")
        if not images.is_dir():
            raise CliError(f"--images {images}: no such folder")
        if val_ann is not None and not val_ann.is_file():
            raise CliError(f"--val-ann {val_ann}: no such file")
        if val_images is not None and val_ann is None:
            raise CliError("--val-images needs --val-ann (the held-out annotations)")
        if val_images is not None and not val_images.is_dir():
            raise CliError(f"--val-images {val_images}: no such folder")
        steps = _milestones(milestones)
        ratio = None if resize_min is None else (resize_min, resize_max)
        if ratio is None and resize_max != 2.0:
            ratio = ({"coco": 0.9, "lvis": 0.1}[dataset.value], resize_max)
        if ratio is not None and ratio[0] > ratio[1]:
            raise CliError(f"--resize-min {ratio[0]} is larger than --resize-max {ratio[1]}")
        env = DistEnv.from_env()
        quiet = quiet or env.rank != 0
        opts = weight_options(cache_dir, offline, checkpoint, clip_weights, components=COMPONENTS)
        overrides = opts["overrides"] or {}
        spec = resolve_spec(model)
        if spec.kind != "ovsam":
            raise CliError(f"{model} is a baseline; finetuning needs an OVSAM model")

    from ovsam_model.train.common import local_rank_zero_first
    from ovsam_model.train.finetune import FinetuneConfig, FinetuneError, FinetuneInterrupted, run_finetune
    from ovsam_model.weights import resolve_cache_dir, resolve_model_weights

    with user_errors(also=(FinetuneError,)):
        run_device = resolve_device(device, env.local_rank if env.distributed else None)
        # the frozen parts; clip2sam only when given (to start from); SAM's mask decoder, where the
        # one-token decoder starts (the released setting; extracted once, 16 MB, cached), unless
        # clip2sam is given or the model has no released files (tiny)
        wanted = [c for c in ("sam2clip", "prompt_encoder") if c in spec.components]
        if spec.files and "clip2sam" not in overrides:
            wanted.append("sam_decoder")
        # under torchrun, local rank 0 downloads what the cache lacks while the other ranks wait
        weights = local_rank_zero_first(lambda: resolve_model_weights(
            spec, cache_dir=cache_dir, offline=opts["offline"], overrides=overrides, clip_weights=clip_weights,
            components=wanted, extra_files=[sam_decoder_weight("vit_h")], progress=not quiet,
            fetch_clip=env.distributed))
        cfg = FinetuneConfig(
            ann=ann, images=images, out=out, dataset=dataset.value, model=model, epochs=epochs, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, warmup_iters=warmup_iters, milestones=steps, grad_clip=grad_clip,
            prompts_per_image=prompts_per_image, resize_ratio=ratio, flip=flip, cache_features=cache_features,
            max_iters=max_iters, save_every=save_every,
            workers=workers, device=run_device, resume=resume, seed=seed, amp=amp,
            weights={c: p for c, p in weights.paths.items() if c != "sam_decoder"},
            sam_decoder=weights.paths.get("sam_decoder"), clip_pretrained=weights.clip_pretrained,
            clip_cache_dir=weights.clip_cache_dir, clip_tag=weights.clip_identity, cache_dir=resolve_cache_dir(cache_dir),
            val_ann=val_ann, val_images=val_images, eval_every=eval_every,
        )
        try:
            result = run_finetune(cfg, progress=not quiet)
        except FinetuneInterrupted as e:
            exit_interrupted(e, env.rank)
    last = result.losses[-1] if result.losses else None
    last_loss = (f", last loss {last['loss']:.4g} (ce {last['ce']:.3g}, bce {last['bce']:.3g}, "
                 f"dice {last['dice']:.3g})") if last else ""
    info(f"{result.step}/{result.total} iterations (epoch {result.epoch}) on {result.images} image(s){last_loss}; "
         f"resume state: {result.last}", quiet)
    if env.rank == 0:
        report_training(out, result.evals, plot, quiet)
    if env.rank == 0:
        typer.echo(str(result.finetuned))
