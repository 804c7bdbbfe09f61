"""Process-level helpers every entry point shares: the torchrun environment and bf16 autocast.

Kept free of model code so that the CLI, the labeling engine and the training loops read the
same variables the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class DistEnv:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK (1 / 0 / 0 outside torchrun)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        return cls(world=int(env.get("WORLD_SIZE", "1")), rank=int(env.get("RANK", "0")),
                   local_rank=int(env.get("LOCAL_RANK", "0")))


def autocast_context(device, amp: bool, cpu_bf16: bool = False):
    """bf16 autocast on CUDA when `amp`, on CPU when `cpu_bf16`; float32 otherwise."""
    import torch

    kind = torch.device(device).type
    if (amp and kind == "cuda") or (cpu_bf16 and kind == "cpu"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast runs the
    convolutions and matrix products ~2x faster than float32; elsewhere it is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query: absent from some builds
        return False
