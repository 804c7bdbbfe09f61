"""What the training loops share: torchrun process-group set-up, RNG state for exact resumes,
the Ctrl-C exception that carries where `last.pth` was saved, and `ResumableTrainer`. The
torchrun environment and bf16 autocast come from `ovsam_model.runtime`."""

from __future__ import annotations

import abc
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import torch_save_atomic
from ..runtime import DistEnv, autocast_context


class TrainingInterrupted(Exception):
    """Ctrl-C during training: `last.pth` was saved at `step` (by rank 0)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at iteration {step}; saved {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


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
    """(rank, world size); initialises the process group under torchrun (`runtime.DistEnv`)."""
    if not DistEnv.from_env().distributed:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every process (no-op for a single one)."""
    if world > 1:
        dist.barrier()


class ResumableTrainer(abc.ABC):
    """What the training loops share: the optimizer and scheduler of `trainable` (wrapped in DDP
    under torchrun), the iteration counter, and rank-0 checkpoints: `last.pth` with everything
    `--resume` needs, and the trained weights in the released layout (`official_name`).

    Subclasses call `setup(...)`, define `saved_modules` (checkpoint key → module) and
    `official_state()`, and may list config fields that are not saved in `config_exclude`.
    """

    last_name = "last.pth"
    official_name: str
    saved_modules: dict[str, nn.Module]
    config_exclude: tuple[str, ...] = ()

    def setup(self, cfg: Any, device: torch.device, rank: int, world: int, iters_per_epoch: int, total: int,
              trainable: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.ipe, self.total = iters_per_epoch, total
        self.trainable, self.optimizer, self.scheduler = trainable, optimizer, scheduler
        self.wrapped: nn.Module = trainable
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(trainable, device_ids=ids)
        self.step = 0

    def autocast(self):
        """bf16 autocast on CUDA when `cfg.amp` (the losses are computed in float32)."""
        return autocast_context(self.device, self.cfg.amp)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, clip (`cfg.grad_clip` > 0), step the optimizer and the per-iteration schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    @abc.abstractmethod
    def official_state(self) -> dict[str, torch.Tensor]:
        """The trained weights in the released file layout (each loop has its own)."""

    def state(self) -> dict:
        return {
            **{name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in self.saved_modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.ipe,
            "total": self.total,
            "rng": rng_state(),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()
                       if k not in self.config_exclude},
        }

    def load(self, state: dict) -> None:
        for name, module in self.saved_modules.items():
            module.load_state_dict(state[name], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save(self) -> tuple[Path, Path]:
        """Rank 0 writes `last.pth` and the released-layout file atomically; returns both paths."""
        out = Path(self.cfg.out)
        last, official = out / self.last_name, out / self.official_name
        if self.rank == 0:
            torch_save_atomic(self.state(), last)
            torch_save_atomic(self.official_state(), official)
        return last, official
