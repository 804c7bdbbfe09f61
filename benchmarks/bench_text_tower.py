"""CLIP text tower: open_clip's `encode_text` (all 77 positions) vs `encode_text_truncated` (up to
the longest prompt of the batch), on one batch of LVIS prompts at RN50x16's text-tower size
(width 768, 12 layers, 12 heads), random weights, in one process; min of `--repeat` runs each.

    python benchmarks/bench_text_tower.py            # ~8 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import os
import time

import open_clip
import torch

from ovsam_model import vocab as V
from ovsam_model.modeling.text_tower import encode_text_truncated


def lvis_batch(n: int) -> list[str]:
    """The first n prompts in the order `text_embeddings` encodes LVIS (synonym-major, 14 templates)."""
    vocab = V.load_vocabulary("lvis")
    unique = list(dict.fromkeys(s for syn in vocab.synonyms for s in syn))
    return [t.format(s) for s in unique[: n // len(V.TEMPLATES) + 1] for t in V.TEMPLATES][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    vision = dict(image_size=64, layers=[1, 1, 1, 1], width=8)  # the smallest ModifiedResNet: unused
    text = dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)
    model = open_clip.model.CLIP(embed_dim=768, vision_cfg=vision, text_cfg=text).eval()
    tokens = open_clip.get_tokenizer("RN50")(lvis_batch(args.prompts))
    length = int(((tokens != 0).long() * torch.arange(tokens.shape[1])).max()) + 1

    def best(fn) -> tuple[float, torch.Tensor]:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(tokens)
            times.append(time.perf_counter() - t0)
        return min(times), out

    load0 = os.getloadavg()[0]
    t_trunc, out = best(lambda t: encode_text_truncated(model, t))
    t_full, ref = best(model.encode_text)
    diff = (out - ref).abs().max().item() / ref.abs().max().item()
    print(f"{args.prompts} LVIS prompts, L={length}/77, {torch.get_num_threads()} threads, load {load0:.1f} → "
          f"{os.getloadavg()[0]:.1f}: full {t_full:.2f} s, truncated {t_trunc:.2f} s (min of {args.repeat}), "
          f"×{t_full / t_trunc:.1f}; max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
