"""The distillation teacher (SAM's image encoder) and its on-disk embedding cache.

The teacher runs once per image: its 256×64×64 post-neck embedding of the 1024-padded image is
stored as fp16, one file per image, keyed by (image path, size, mtime, teacher identity, input
size), so a changed image or another teacher never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn
from torch.utils.data import Dataset

from ..atomic import torch_save_atomic
from ..builder import build_sam
from ..io.loader import ordered_loader
from ..modeling.fast_attention import use_sdpa

TEACHERS = ("vit_h", "tiny")


def teacher_identity(kind: str, weights: Optional[Path] = None, tiny_dims: tuple[int, int] = (64, 32)) -> str:
    """What names a teacher in the cache key (no weights are read)."""
    if kind == "vit_h":
        if weights is None:
            raise ValueError("the vit_h teacher needs SAM ViT-H weights")
        return f"sam_vit_h:{Path(weights).name}:{Path(weights).stat().st_size}"
    if kind == "tiny":
        return f"tiny:{tiny_dims[0]}x{tiny_dims[1]}:seed0"
    raise ValueError(f"unknown teacher {kind!r} (known: {', '.join(TEACHERS)})")


def build_teacher(kind: str, *, weights: Optional[Path] = None, image_size: int = 1024,
                  tiny_dims: tuple[int, int] = (64, 32)) -> tuple[ImageEncoderViT, str]:
    """SAM's image encoder and a string naming it for the cache key.

    "vit_h": SAM ViT-H loaded strictly from `weights` (a whole SAM checkpoint). "tiny": a
    2-block `ImageEncoderViT` with random weights (seed 0, a random absolute position
    embedding), `tiny_dims` = (embed dim, output channels) chosen to match the tiny student's
    adapter so that its position embedding can be copied, as for ViT-H.
    """
    identity = teacher_identity(kind, weights, tiny_dims)
    if kind == "vit_h":
        encoder = build_sam("vit_h", weights).image_encoder
    else:
        dim, out = tiny_dims
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=dim, depth=2, num_heads=2,
                                      out_chans=out, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=14, global_attn_indexes=(1,))
            nn.init.normal_(encoder.pos_embed, std=0.02)
    use_sdpa(encoder)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, identity


class TeacherCache:
    """`root/<sha256 of the key>.pt` holding one fp16 [C, g, g] embedding per image."""

    def __init__(self, root: Path, identity: str, image_size: int = 1024) -> None:
        self.root = Path(root)
        self.identity = identity
        self.image_size = image_size

    def path_for(self, image: Path) -> Path:
        image = Path(image).resolve()
        st = image.stat()
        key = f"{image}\0{st.st_size}\0{st.st_mtime_ns}\0{self.identity}\0{self.image_size}"
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def has(self, image: Path) -> bool:
        return self.path_for(image).is_file()

    def load(self, image: Path) -> torch.Tensor:
        """[C, g, g] float32."""
        return torch.load(self.path_for(image), map_location="cpu", weights_only=True).float()

    def save(self, image: Path, embedding: torch.Tensor) -> None:
        torch_save_atomic(embedding.detach().to("cpu", torch.float16).contiguous(), self.path_for(image))


class _Pixels(Dataset):
    """Item i: `load_pixels(paths[i])`, or the OSError / ValueError it raised (re-raised by
    `fill_cache` as it is, not wrapped in a message about the DataLoader worker)."""

    def __init__(self, paths: Sequence[Path], load_pixels: Callable[[Path], torch.Tensor]) -> None:
        self.paths, self.load_pixels = list(paths), load_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Union[torch.Tensor, Exception]:
        try:
            return self.load_pixels(self.paths[i])
        except (OSError, ValueError) as e:
            return e


def _stack(items: list) -> Union[torch.Tensor, Exception]:
    """[B, 3, S, S] pixels of a batch (stacked in the worker, so that the batch is pinned), or its first error."""
    errors = [x for x in items if isinstance(x, Exception)]
    return errors[0] if errors else torch.stack(items)


def fill_cache(
    cache: TeacherCache,
    images: Sequence[Path],
    teacher: Callable[[torch.Tensor], torch.Tensor],
    load_pixels: Callable[[Path], torch.Tensor],
    *,
    device: torch.device,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 0,
    pin_memory: Optional[bool] = None,
) -> int:
    """Compute and store the embeddings of the images without a cache entry among this rank's
    share (every `world_size`-th image of `images`). `teacher`: pixels [B, 3, S, S] → [B, C, g, g];
    `load_pixels`: path → [3, S, S], run in `workers` DataLoader processes (0: this one; a
    picklable function, e.g. a `functools.partial`, where workers do not fork), batches in the
    order of the share;
    `pin_memory` (default: on CUDA) pins the batches for an asynchronous copy to `device`.
    `progress(n)` is called after each batch with its size. Returns how many embeddings this
    rank computed.

    The share is taken before looking at the cache: a share of the *missing* images would
    depend on when each rank looks, and a rank that looks after another has written an entry
    would skip an image that no rank then computes."""
    missing = [p for p in list(images)[rank::world_size] if not cache.has(p)]
    if not missing:
        return 0
    device = torch.device(device)
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    loader = ordered_loader(_Pixels(missing, load_pixels), batch_size=batch_size, collate_fn=_stack, pin_memory=pin,
                            workers=min(max(0, workers), math.ceil(len(missing) / batch_size)))
    for start, batch in zip(range(0, len(missing), batch_size), loader):
        if isinstance(batch, Exception):
            raise batch
        chunk = missing[start:start + batch_size]
        pixels = batch.to(device, non_blocking=pin)
        with torch.no_grad():
            embeddings = teacher(pixels).float()
        for path, emb in zip(chunk, embeddings):
            cache.save(path, emb)
        if progress is not None:
            progress(len(chunk))
    return len(missing)
