"""`ovsam finetune` iterations per second on the tiny-256 model (real images, COCO base classes,
batch 4, 16 prompts per image; `recipes/tiny_finetune.sh` now uses 8), in one process:

1. per-group decoding: one `head.decode` call per image and prompt kind (the call pattern
   before the whole batch was decoded in one call);
2. the current path (one decode call for the batch);
3. the current path with `--cache-features` (frozen features and resized data kept per image).

Each row trains from the same initial weights on the same batches (one scale, no flips) after
`--warmup` steps; data loading is timed with the step (workers 0).

    python benchmarks/bench_finetune_step.py --steps 60     # about 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_common import DATA, machine
from ovsam_model.builder import resolve_spec
from ovsam_model.modeling.clip2sam import multilevel_roi_align
from ovsam_model.train import finetune as FT
from ovsam_model.train import finetune_data as FD
from ovsam_model.vocab import text_embeddings


def per_group_forward(self, clip_feats, embeddings, image_pe, groups):
    """`CLIP2SAMTrainable.forward` with one decode call per prompt group."""
    fpn = self.fpn(clip_feats)
    out = [self.head.decode(embeddings[b : b + 1], image_pe, sparse, dense) for b, sparse, dense, _ in groups]
    rois = torch.cat([torch.cat([bx.new_full((len(bx), 1), float(b)), bx.float()], 1) for b, _, _, bx in groups])
    region = self.head.region_embed(multilevel_roi_align(fpn, rois, self.roi_size, finest_scale=self.finest_scale),
                                    torch.cat([label for _, label in out]))
    return torch.cat([m for m, _ in out]), region + 0.0 * sum(f.float().mean() for f in fpn)


def time_row(cfg: FT.FinetuneConfig, images, vocab, steps: int, warmup: int) -> float:
    """Seconds per iteration (data + step) after `warmup` iterations."""
    spec = resolve_spec(cfg.model)
    model = FT.build_finetune_model(cfg)
    embeds = text_embeddings(vocab, model.trunk)
    dataset = FD.FinetuneDataset(images, vocab, spec.config.image_size, spec.preprocessing.mean,
                                 spec.preprocessing.std, FD.Augment(flip=0.0, ratio=(1.0, 1.0)), 16, 0,
                                 memo=cfg.cache_features)
    trainer = FT._Trainer(cfg, model, embeds, torch.device("cpu"), 0, 1, 1, steps + warmup, None,
                          draws=len(dataset))
    model.eval()
    trainer.trainable.train()
    n = len(dataset)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = FD.collate([dataset[(4 * step + k) % n] for k in range(4)])
        trainer.train_step(batch)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: one pass, so the "
                    "cached row times its cache hits)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    mini = DATA / "coco-val2017-mini"
    gt, vocab, base = FD.read_annotations(mini / "instances.json", "coco")
    images = FD.collect_images(gt, mini / "images", base, 256)
    warmup = args.warmup if args.warmup is not None else -(-len(images) // 4)
    cfg = dict(ann=mini / "instances.json", images=mini / "images", out=Path("/tmp/unused"), model="tiny-256",
               batch_size=4, prompts_per_image=16, lr=1e-3, warmup_iters=10, grad_clip=1.0, resize_ratio=(1.0, 1.0),
               flip=0.0, workers=0)
    rows = {}
    plain = FT.CLIP2SAMTrainable.forward
    FT.CLIP2SAMTrainable.forward = per_group_forward
    rows["per-group decoding"] = time_row(FT.FinetuneConfig(**cfg), images, vocab, args.steps, warmup)
    FT.CLIP2SAMTrainable.forward = plain
    rows["one decode call per batch"] = time_row(FT.FinetuneConfig(**cfg), images, vocab, args.steps, warmup)
    rows["... and --cache-features"] = time_row(FT.FinetuneConfig(**cfg, cache_features=True), images, vocab,
                                                args.steps, warmup)
    base_s = rows["per-group decoding"]
    print(f"tiny-256 finetune, batch 4 × 16 prompts, {args.steps} timed steps after {warmup}, "
          f"{torch.get_num_threads()} threads")
    print("| row | s/iteration | iterations/s | speed-up |\n|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.4f} | {1 / s:.2f} | {base_s / s:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "steps": args.steps, "warmup": warmup,
                                         "seconds_per_iteration": rows}, indent=2))


if __name__ == "__main__":
    main()
