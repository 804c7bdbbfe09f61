"""What the training loops share: torchrun process-group set-up, RNG state for exact resumes,
the Ctrl-C exception that carries where `last.pth` was saved, the checks before a run starts
(`started_run`), and `ResumableTrainer`. The torchrun environment and bf16 autocast come from
`ovsam_model.runtime`."""

from __future__ import annotations

import abc
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import torch_save_atomic
from ..runtime import DistEnv, autocast_context
from .run_log import CONFIG, METRICS, MetricsLog, RunFolderBusy, claim_run_folder


class TrainingInterrupted(Exception):
    """Ctrl-C during training: `last.pth` was saved at `step` (by rank 0)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at iteration {step}; saved {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


class CtrlCGuard:
    """Ctrl-C (SIGINT) while training: `KeyboardInterrupt` at once, except between `hold()` and
    `release()` (an optimizer step until its log record exists), where it is raised at `release()`.
    A step cut halfway (parameters updated but not the step counter or the scheduler) would be
    saved in last.pth and silently redone on --resume. Only the main thread installs a handler,
    and not where SIGINT is ignored (a background job of a script) nor when not `enabled`;
    elsewhere, and outside the `with` block, it changes nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.holding = False
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "CtrlCGuard":
        main = threading.current_thread() is threading.main_thread()
        if self.enabled and main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        self.holding = self.pending = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.holding:
            self.pending = True
            return
        raise KeyboardInterrupt

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        """End the hold; raise the Ctrl-C that came during it, if any."""
        self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def rng_state() -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, python), for an exact --resume, as
    tensors and plain containers (`last.pth` loads with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
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


T = TypeVar("T")


def local_rank_zero_first(fetch: Callable[[], T]) -> T:
    """`fetch()` (resolving weight files: it downloads what the cache lacks) under torchrun:
    local rank 0 of each node runs it first while the other ranks wait at a barrier, then they
    run it too and find the files in the cache. Outside torchrun: just `fetch()`.

    Initialises the process group (`dist_info`). The barrier is an all-reduce of a failure
    flag: when a local rank 0 fails, it raises its own error and every other rank raises a
    one-line `WeightsError` instead of downloading the files itself or waiting forever."""
    from ..weights import WeightsError

    _, world = dist_info()
    if world == 1:
        return fetch()
    local_rank = DistEnv.from_env().local_rank
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if local_rank == 0:
        try:
            result = fetch()
        except Exception as e:
            error = e
    failed = torch.tensor([float(error is not None)])
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(local_rank)
        failed = failed.cuda()
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if float(failed.item()) > 0:
        raise WeightsError("local rank 0 could not fetch the weight files (its message says why)")
    return result if local_rank == 0 else fetch()


# Options that may change between a run and its --resume (how it runs, not what it computes).
RESUME_FREE = frozenset({
    "resume", "device", "workers", "save_every", "eval_every", "val_images", "val_ann", "teacher_batch",
    "teacher_cache", "clip_cache_dir", "cache_dir", "teacher_weights", "adapter_init", "sam_decoder", "weights",
    "clip_pretrained", "clip_tag", "plot", "cache_features",
})
STATE_FORMAT = 2  # last.pth: tensors and plain containers only (weights_only=True)


class ResumeError(ValueError):
    """A `last.pth` that this run cannot continue from (one line, naming what differs)."""


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_differences(saved: dict, current: dict) -> list[str]:
    """`--option SAVED (now CURRENT)` for each run-defining option that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_FREE:
            continue
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if _jsonish(old) != _jsonish(new):
            out.append(f"{option_name(key)} {_show(old)} (now {_show(new)})")
    return out


def _jsonish(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def run_config(cfg: Any, exclude: tuple[str, ...] = ()) -> dict:
    """A run's options as saved in last.pth and compared on --resume."""
    from .run_log import plain_options

    return plain_options(cfg, exclude)


def read_resume_state(path: Path, current_config: dict) -> dict:
    """`last.pth` loaded safely (`weights_only=True`) and checked against this run's options;
    `ResumeError` in one line otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle refusals and corrupt files alike
        from ..checkpoint import load_failure_reason

        raise ResumeError(f"--resume: {path} is not a training state this version can load safely "
                          f"({load_failure_reason(e)[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"--resume: {path} was written by another version of ovsam (state format "
                          f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this one reads "
                          f"{STATE_FORMAT}); start a new run")
    saved = state.get("config", {})
    only_saved = sorted(set(saved) - set(current_config) - RESUME_FREE)
    only_now = sorted(set(current_config) - set(saved) - RESUME_FREE)
    if only_saved and only_now:  # options of another command (distill vs finetune), not changed values
        raise ResumeError(f"--resume: {path} is the state of another kind of run (it has {option_name(only_saved[0])}, "
                          f"this one has {option_name(only_now[0])}): resume it with the command that made it, "
                          f"or give another --out")
    differences = config_differences(saved, current_config)
    if differences:
        raise ResumeError(f"--resume: {path} was made with other options: {'; '.join(differences)}")
    return state


def remove_stale_temps(out: Path, names: tuple[Optional[str], ...]) -> list[Path]:
    """Remove the temp files (`atomic_path`'s `.NAME.XXXX.tmp`) of `names` that a killed run left
    in `out`: each is as large as the checkpoint it was to replace, and nothing ever reads it.
    Call only while holding the folder lock (no other run writes there). Returns those removed."""
    removed = []
    for name in filter(None, names):
        for tmp in Path(out).glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:  # not ours to fix; it is only wasted space
                pass
    return removed


@dataclass(frozen=True)
class StartedRun:
    """What `started_run` settled: this process's rank, the world size, this rank's share of
    the global batch, the output folder, its `last.pth`, and the checked state read from it
    (None without --resume)."""

    rank: int
    world: int
    per_rank: int
    out: Path
    last_path: Path
    state: Optional[dict]


@contextmanager
def started_run(cfg: Any, trainer: type[ResumableTrainer], error: type[Exception]) -> Iterator[StartedRun]:
    """The checks every training command makes before any work (the teacher, the model), in
    this order: the global `cfg.batch_size` splits over the processes, `--resume` has a
    `last.pth` (the trainer's `last_name`) to resume from, made with the same options (its
    `config_exclude` left out), and no other run writes `cfg.out` (rank 0 holds the folder
    lock for the whole `with` block, released however it ends). Each failure is raised as
    `error` (the command's own class) with the message the command has always given; one place
    for them, so that distill and finetune cannot drift apart."""
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise error(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    out = Path(cfg.out)
    last_path = out / trainer.last_name
    if cfg.resume and not last_path.is_file():
        raise error(f"--resume: no {last_path} to resume from")
    try:
        state = read_resume_state(last_path, run_config(cfg, trainer.config_exclude)) if cfg.resume else None
    except ResumeError as e:
        raise error(str(e)) from None
    try:  # a second run on the same folder stops here
        folder_lock = claim_run_folder(out) if rank == 0 else None
    except RunFolderBusy as e:
        raise error(str(e)) from None
    if folder_lock is not None:
        remove_stale_temps(out, (trainer.last_name, getattr(trainer, "official_name", None), METRICS, CONFIG))
    try:
        yield StartedRun(rank, world, cfg.batch_size // world, out, last_path, state)
    finally:
        if folder_lock is not None:
            folder_lock.close()


class ResumableTrainer(abc.ABC):
    """What the training loops share: the optimizer and scheduler of `trainable` (wrapped in DDP
    under torchrun), the iteration counter, the loop itself (`fit`: metrics log, evals,
    checkpoints, Ctrl-C), and rank-0 checkpoints: `last.pth` with everything `--resume` needs,
    and the trained weights in the released layout (`official_name`).

    Subclasses call `setup(...)`, define `saved_modules` (checkpoint key → module),
    `official_state()` and `train_step(batch)`; `evaluate()` when they have a validation set;
    and may list config fields that are not saved in `config_exclude`.
    """

    last_name = "last.pth"
    official_name: str
    saved_modules: dict[str, nn.Module]
    config_exclude: tuple[str, ...] = ()
    interrupted: type[TrainingInterrupted] = TrainingInterrupted

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
        self.extra: dict[str, Any] = {}  # plain figures kept in last.pth (e.g. eval references)
        # installed by `fit`; one process only: under torchrun a held rank would wait in the next
        # all-reduce for ranks that already stopped, instead of saving
        self.ctrl_c = CtrlCGuard(enabled=world == 1)

    def autocast(self):
        """bf16 autocast on CUDA when `cfg.amp` (the losses are computed in float32)."""
        return autocast_context(self.device, self.cfg.amp)

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, clip (`cfg.grad_clip` > 0), step the optimizer and the per-iteration schedule;
        returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), limit)
        self.ctrl_c.hold()  # released by `fit` once this step's record exists
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(norm)

    @abc.abstractmethod
    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; the loss terms (float, rank-local) with their sum under "loss",
        and "grad_norm"."""

    def batch_size_of(self, batch: Any) -> int:
        return int(batch["pixels"].shape[0]) if isinstance(batch, dict) else int(batch[0].shape[0])

    def evaluate(self) -> Optional[dict[str, float]]:
        """The validation figures (every rank calls it), or None without a validation set."""
        return None

    @abc.abstractmethod
    def official_state(self) -> dict[str, torch.Tensor]:
        """The trained weights in the released file layout (each loop has its own)."""

    def run_config(self) -> dict:
        """The options that define the run, as saved in last.pth and compared on --resume."""
        return run_config(self.cfg, self.config_exclude)

    def state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            **{name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in self.saved_modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.ipe,
            "total": self.total,
            "rng": rng_state(),
            "config": self.run_config(),
            "extra": dict(self.extra),
        }

    def load(self, state: dict) -> None:
        for name, module in self.saved_modules.items():
            module.load_state_dict(state[name], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.extra = dict(state.get("extra", {}))
        set_rng_state(state["rng"])

    def resume_from(self, path: Path, state: dict) -> None:
        """Load the state read from `path` by `read_resume_state` (options already checked)."""
        if state.get("total") != self.total:
            raise ResumeError(f"--resume: {path} was made for {state.get('total')} iterations, these options give "
                              f"{self.total} (use the same --epochs/--batch-size/--max-iters and data)")
        self.load(state)

    def save(self) -> tuple[Path, Path]:
        """Rank 0 writes `last.pth` and the released-layout file atomically; returns both paths."""
        out = Path(self.cfg.out)
        last, official = out / self.last_name, out / self.official_name
        if self.rank == 0:
            torch_save_atomic(self.state(), last)
            torch_save_atomic(self.official_state(), official)
        return last, official

    def _global_terms(self, terms: dict[str, float], images: int) -> tuple[dict[str, float], int]:
        """Loss terms averaged over the ranks (each rank's batch counts by its size) and the
        images of the global batch."""
        if self.world == 1:
            return terms, images
        names = sorted(terms)
        packed = torch.tensor([terms[k] * images for k in names] + [float(images)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            packed = packed.to(self.device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        total = float(packed[-1])
        return {k: float(v) / total for k, v in zip(names, packed[:-1])}, int(total)

    def fit(self, dataset: Any, sampler: Any, per_rank: int, *, desc: str, progress: bool,
            collate_fn: Optional[Callable] = None, log: Optional[MetricsLog] = None) -> list[dict[str, float]]:
        """Train from `self.step` to `self.total`: one metrics record per step (loss terms,
        lr, grad_norm, images/s; `eval` every `cfg.eval_every` steps and at the end, and at step
        0 before training), `last.pth` every `cfg.save_every` steps and at the end. Ctrl-C saves
        and raises `self.interrupted`; an optimizer step is never cut halfway (`CtrlCGuard`), nor
        is the final save skipped. Returns this run's records (rank 0's view)."""
        log = log or MetricsLog(Path(self.cfg.out), enabled=False)
        records: list[dict[str, float]] = []
        self._unlogged: Optional[dict] = None  # a step's record until it is in the log
        bar = tqdm(total=self.total, initial=self.step, desc=desc, unit="it", file=sys.stderr,
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        try:
            with self.ctrl_c:
                self._train_loop(dataset, sampler, per_rank, collate_fn, log, records, bar)
                self.save()  # inside the `try`: Ctrl-C during the final save still leaves last.pth
        except KeyboardInterrupt:
            bar.close()
            if self._unlogged is not None:  # interrupted in the eval after a step: log the step without it
                log.write(self._unlogged)
            last, _ = self.save()
            log.close()
            raise self.interrupted(self.step, last) from None
        bar.close()
        log.close()
        barrier(self.world)
        return records

    def _train_loop(self, dataset: Any, sampler: Any, per_rank: int, collate_fn: Optional[Callable],
                    log: MetricsLog, records: list[dict[str, float]], bar: tqdm) -> None:
        """`fit`'s loop: the step-0 eval, then the steps up to `self.total` (without the final save)."""
        eval_every = int(getattr(self.cfg, "eval_every", 0) or 0)
        if self.step == 0 and not self.extra.get("step0_evaluated"):  # same answer on every rank
            figures = self.evaluate()
            if figures is not None:
                log.write({"step": 0, "epoch": 0, "eval": figures})
            self.extra["step0_evaluated"] = True
        tick = time.perf_counter()
        while self.step < self.total:
            epoch = self.step // self.ipe
            sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            order = list(sampler)[(self.step - epoch * self.ipe) * per_rank:]
            loader = DataLoader(dataset, batch_size=per_rank, sampler=order, num_workers=self.cfg.workers,
                                collate_fn=collate_fn, pin_memory=self.device.type == "cuda", drop_last=False)
            for batch in loader:
                lr = self.scheduler.get_last_lr()[0]
                terms = self.train_step(batch)
                norm = terms.pop("grad_norm")
                terms, images = self._global_terms(terms, self.batch_size_of(batch))
                now = time.perf_counter()
                pending = {"step": self.step, "epoch": (self.step - 1) // self.ipe, **terms, "lr": lr,
                           "grad_norm": norm, "images_per_s": images / max(now - tick, 1e-9)}
                self._unlogged = pending
                self.ctrl_c.release()  # held since the optimizer step: a Ctrl-C then is raised now
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()} | {"lr": f"{lr:.3g}", "epoch": epoch})
                if (eval_every > 0 and self.step % eval_every == 0) or self.step == self.total:
                    figures = self.evaluate()
                    if figures is not None:
                        pending["eval"] = figures
                log.write(pending)
                records.append(pending)
                self._unlogged = None
                if self.cfg.save_every > 0 and self.step % self.cfg.save_every == 0 and self.step < self.total:
                    self.save()
                tick = time.perf_counter()
                if self.step >= self.total:
                    break
