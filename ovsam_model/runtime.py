"""Process-level helpers every entry point shares: the torchrun environment, bf16 autocast,
free memory and byte counts for messages.

Kept free of model code so that the CLI, the labeling engine and the training loops read the
same variables the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
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


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX; Arm's BF16 extension


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX or Arm's BF16), where bf16
    autocast runs the convolutions and matrix products ~2x faster than float32; elsewhere oneDNN
    emulates it and it is slower. Read from the CPU flags of `cpuinfo` (Linux); elsewhere from
    oneDNN's own check, which also says yes for AVX-512 CPUs that only emulate bf16."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = None
    if text is not None:
        flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
                 for flag in line.split(":", 1)[-1].split()}
        if flags:
            return bool(flags & NATIVE_BF16_FLAGS)
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query: absent from some builds
        return False


def free_memory(device) -> Optional[int]:
    """Free bytes on a torch device (CUDA: the allocator's view; CPU: available physical memory
    on Linux), or None where unknown."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def human_size(size: Optional[float]) -> str:
    """Bytes in decimal units for messages: 999 B, 1.5 KB, …, 12.3 GB; "?" for None."""
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "?"
