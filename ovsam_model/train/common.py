"""What the training loops share: torchrun process-group set-up, RNG state for exact resumes,
bf16 autocast on CUDA, and the Ctrl-C exception that carries where `last.pth` was saved."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class TrainingInterrupted(Exception):
    """Ctrl-C during training: `last.pth` was saved at `step` (by rank 0)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at iteration {step}; saved {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def train_autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp` (losses are computed in float32 by the callers)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def rng_state() -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, python), for an exact --resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every process (no-op for a single one)."""
    if world > 1:
        dist.barrier()


