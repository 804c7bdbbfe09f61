"""Shared CLI pieces: the stderr console, one-line failures, device choice, reusable options.

Every command uses these, so that an option means the same thing and a mistake reads the same
way in `label`, `eval` and `weights`.

This module, `ovsam_cli.main` and the command modules import no torch (nor open_clip,
segment_anything or the model code) at their top: the commands import those inside their
functions, after the cheap checks of their arguments, so that a mistake is reported at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console, ConsoleDimensions

if TYPE_CHECKING:  # imports torch: only inside the training commands, after their checks
    from ovsam_model.train.common import TrainingInterrupted


class CliError(Exception):
    """An expected failure found by the CLI itself (a mistake in what it was given, or a run that
    cannot go on); `user_errors` prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red line on stderr and exit with `code`."""
    err_console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# A reader that closed the pipe early (`ovsam label --out - | head`) is not an error: like a
# program killed by SIGPIPE (what the shell reports for `cat big | head`), we exit quietly with
# 128 + SIGPIPE = 141, so `set -o pipefail` scripts see the same status as with standard tools.
# Paths: `user_errors` (label's JSON), `out_console` (tables), `main.run` (plain `typer.echo`
# output). `--help` is printed by typer's own rich console, which exits 1, also quietly.
SIGPIPE_EXIT = 141


def exit_broken_pipe() -> NoReturn:
    """Exit quietly with `SIGPIPE_EXIT` after stdout's reader went away. stdout is pointed at
    /dev/null first, so the interpreter's final flush cannot fail again ("Exception ignored ...
    BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner's buffer)
        pass
    raise typer.Exit(SIGPIPE_EXIT)


# Output that does not go to a terminal (a pipe, a file, a test runner's buffer) is never wrapped
# or cut: rich would otherwise lay it out for 80 columns, so that `ovsam weights list | grep lvis`
# missed rows cut short and log files had paths broken over lines. Tables do not `expand`, so
# they stay as wide as their content, not this width.
UNWRAPPED_WIDTH = 1_000_000


def is_tty(stream: Any) -> bool:
    """Whether `stream` is an actual terminal (not merely told to use colours)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


class _Console(Console):
    """rich's Console, but `UNWRAPPED_WIDTH` columns wide when its stream is not a terminal.

    On a terminal (and wherever a width is given, by `width=` or the COLUMNS variable) it
    behaves as rich does. The stream is looked up on every use, as rich does (a test runner
    swaps sys.stdout and sys.stderr)."""

    @property
    def size(self) -> ConsoleDimensions:
        columns = self._environ.get("COLUMNS")
        if self._width is None and not (columns and columns.isdigit()) and not is_tty(self.file):
            return ConsoleDimensions(UNWRAPPED_WIDTH, self._height or 25)
        return Console.size.fget(self)  # type: ignore[attr-defined]

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


class _StdoutConsole(_Console):
    """The stdout console, with our closed-pipe exit (rich's own default is a plain exit 1)."""

    def on_broken_pipe(self) -> None:
        exit_broken_pipe()


# Humans read stderr; stdout is for machine output (tables, paths, JSON).
err_console = _Console(stderr=True)
out_console = _StdoutConsole()


class _PlainLogHandler(logging.Handler):
    """Log records as plain lines on `err_console` (level, message), never wrapped: for a stderr
    that is not a terminal, where rich's log layout would pad every line to the console width."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def log_handler(verbose: int = 0) -> logging.Handler:
    """The handler of the `--verbose` log output on stderr: rich's layout on a terminal, plain
    `LEVEL message` lines elsewhere (with the source location from -vv)."""
    if is_tty(err_console.file):
        from rich.logging import RichHandler

        return RichHandler(console=err_console, show_path=verbose > 1)
    handler = _PlainLogHandler()
    where = " (%(pathname)s:%(lineno)d)" if verbose > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(levelname)s %(message)s{where}"))
    return handler


def info(message: str, quiet: bool = False) -> None:
    """A progress/status line for humans (stderr), silenced by --quiet."""
    if not quiet:
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def user_errors(code: int = 2, also: tuple[type[BaseException], ...] = (), prefix: str = "") -> Iterator[None]:
    """Turn expected failures into one-line `fail` messages, not tracebacks: `CliError`, the
    library's input/weights/model errors, missing or unreadable files, bad option values, and the
    exception types in `also` (e.g. ValueError from the evaluators). `prefix` starts the message
    (e.g. which process failed). A closed stdout pipe exits quietly (`exit_broken_pipe`).
    Imports nothing: the library's error types are looked up among the modules already loaded."""
    try:
        yield
    except CliError as e:
        fail(prefix + first_line(e), e.code)
    except Exception as e:
        if isinstance(e, (*_library_errors(), *also)):
            fail(prefix + first_line(e), code)
        if isinstance(e, BrokenPipeError):
            exit_broken_pipe()
        if isinstance(e, FileNotFoundError):
            fail(prefix + (f"file not found: {e.filename}" if e.filename else first_line(e)), code)
        if isinstance(e, OSError):  # permissions, full disk: the user's to fix, not a traceback
            fail(prefix + (f"{e.strerror or e}: {e.filename}" if e.filename else first_line(e)), code)
        if isinstance(e, typer.BadParameter):
            fail(prefix + e.format_message(), code)
        raise


# The library's expected failures, each with a one-line message: (module, exception type).
_LIBRARY_ERRORS = (
    ("ovsam_model.weights", "WeightsError"),
    ("ovsam_model.checkpoint", "CheckpointError"),
    ("ovsam_model.registry", "UnknownModelError"),
    ("ovsam_model.io.detections", "InputError"),
)


def _library_errors() -> tuple[type[BaseException], ...]:
    """The `_LIBRARY_ERRORS` types of the modules already imported: an error whose module was
    never imported cannot have been raised, so nothing (torch above all) is imported for this."""
    found = []
    for module, name in _LIBRARY_ERRORS:
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type):
            found.append(error)
    return tuple(found)


def parse_checkpoints(values: Optional[Sequence[str]], components: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """`--checkpoint COMPONENT=PATH` values → {component: path}; `typer.BadParameter` on a
    malformed value, a repeated component, or (when `components` is given) an unknown one."""
    known = None if components is None else list(components)
    out: dict[str, Path] = {}
    for value in values or ():
        component, sep, path = value.partition("=")
        component, path = component.strip(), path.strip()
        if not sep or not component or not path:
            raise typer.BadParameter(f"{value!r}: expected COMPONENT=PATH", param_hint="--checkpoint")
        if known is not None and component not in known:
            raise typer.BadParameter(f"unknown component {component!r} (this model has: {', '.join(known) or 'none'})",
                                     param_hint="--checkpoint")
        if component in out:
            raise typer.BadParameter(f"component {component!r} given twice", param_hint="--checkpoint")
        out[component] = Path(path).expanduser()
    return out


def offline_flag(offline: bool) -> Optional[bool]:
    """--offline given → True; not given → None (the library then reads the environment)."""
    return True if offline else None


def weight_options(
    cache_dir: Optional[Path],
    offline: bool,
    checkpoint: Optional[Sequence[str]],
    clip_weights: Optional[Path],
    components: Optional[Iterable[str]] = None,
) -> dict[str, Any]:
    """The shared weights options (`CacheDirOpt` ... `ClipWeightsOpt`) as keyword arguments of
    `ovsam_model.builder.build_predictor`; `components` checks the --checkpoint names."""
    return {
        "cache_dir": cache_dir,
        "offline": offline_flag(offline),
        "overrides": parse_checkpoints(checkpoint, components) or None,
        "clip_weights": clip_weights,
    }


def resolve_device(device: str, local_rank: Optional[int] = None, option: str = "--device") -> str:
    """A --device value → a torch device string; `typer.BadParameter` (naming `option`) when torch
    cannot use it here.

    "auto": cuda when available, else cpu. With `local_rank` (torchrun), a bare "cuda" means this
    process's GPU, cuda:LOCAL_RANK.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{device!r}: expected auto, cpu, cuda or cuda:N", param_hint=option) from None
    if parsed.type not in ("cpu", "cuda"):  # mps, xpu, meta, ...: torch would fail deep in the model build
        raise typer.BadParameter(f"{device!r}: ovsam runs on cpu or cuda (expected auto, cpu, cuda or cuda:N)",
                                 param_hint=option)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"{device!r}: no CUDA device here (use cpu or auto)", param_hint=option)
        if parsed.index is not None and parsed.index >= count:
            raise typer.BadParameter(f"{device!r}: this machine has {count} CUDA device(s)", param_hint=option)
        if parsed.index is None and local_rank is not None:
            return f"cuda:{local_rank}"
    return device


# --- reusable options -------------------------------------------------------------------------

CacheDirOpt = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", file_okay=False, envvar="OVSAM_CACHE_DIR", show_envvar=True,
                 help="Weights cache folder (default ~/.cache/ovsam)."),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Never use the network: cached or --checkpoint files only "
                                   "(also OVSAM_OFFLINE=1 or HF_HUB_OFFLINE=1)."),
]
CheckpointOpt = Annotated[
    Optional[list[str]],
    typer.Option("--checkpoint", metavar="COMPONENT=PATH",
                 help="Use a local weight file for one component, e.g. clip2sam=./clip2sam.pth "
                      "(repeatable; components: `ovsam weights list`)."),
]
ClipWeightsOpt = Annotated[
    Optional[Path],
    typer.Option("--clip-weights", metavar="FILE", dir_okay=False,
                 help="Local open_clip weights for the CLIP trunk instead of open_clip's cache."),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="Torch device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."),
]
VocabOpt = Annotated[
    Optional[str],
    typer.Option("--vocab", help="Class vocabulary: coco, lvis, lvis-synonyms, coco-ov, coco-base, lvis-base, a names file (.txt: one class per line, synonyms separated by commas), or embeddings (.npy / .pth, names from --vocab-names). Default: the categories of --ann (label, with --label-source ovsam) or of the ground truth (eval --protocol prompt), so that ids mean the same classes; else the model's own."),
]
VocabNamesOpt = Annotated[
    Optional[Path],
    typer.Option("--vocab-names", metavar="FILE", dir_okay=False,
                 help="Class names (one per line) for a --vocab of embeddings (.npy [K, D] or .pth [K, P, D])."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, warnings or summaries on stderr (errors still show).")]


class RoiBox(str, Enum):
    """Where the CLIP RoI features are pooled."""

    mask = "mask"
    prompt = "prompt"


RoiBoxOpt = Annotated[
    RoiBox,
    typer.Option("--roi-box", help="Box of the CLIP RoI features: mask (the predicted mask's box; the official "
                                   "choice) or prompt (the prompt box)."),
]


# --- options of the training commands (distill, finetune); defaults stay in each signature ------

EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Passes over the images.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1,
                                           help="Global batch of images (split over torchrun processes).")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="AdamW peak learning rate.")]
GradClipOpt = Annotated[float, typer.Option("--grad-clip", min=0.0, help="Gradient-norm clip (0: none).")]
MaxItersOpt = Annotated[Optional[int], typer.Option(
    "--max-iters", min=1, help="Stop after N iterations (also the schedule's length; smoke tests).")]
SaveEveryOpt = Annotated[int, typer.Option(
    "--save-every", min=0, help="Save last.pth and the trained weights every N iterations (0: only at the end).")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pth (same options and data).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed of the initialisation and of every random draw (data order, augmentation, prompts).")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (losses stay float32).")]
EvalEveryOpt = Annotated[int, typer.Option(
    "--eval-every", min=0, help="With a validation set: evaluate every N iterations, besides before the first and "
                                "after the last (0: only those two). The figures go to OUT/metrics.jsonl.")]
PlotOpt = Annotated[bool, typer.Option(
    "--plot", help="At the end, draw OUT/curves.png from OUT/metrics.jsonl (as `ovsam plot OUT`).")]


def exit_interrupted(e: TrainingInterrupted, rank: int) -> NoReturn:
    """Ctrl-C during a training command (`distill`, `finetune`): where the state was saved and
    the command line that resumes from it (this one with --resume); exits 130."""
    again = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
    info(f"interrupted at iteration {e.step}; saved {e.checkpoint}", quiet=rank != 0)
    info(f"resume with: ovsam {shlex.join(again)}", quiet=rank != 0)
    raise typer.Exit(130) from None


def report_training(out: Path, evals: Sequence[dict], plot: bool, quiet: bool) -> None:
    """After a training run: the last eval figures, where the log is, and the curves (--plot)."""
    if evals:
        last = evals[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last["eval"].items() if isinstance(v, (int, float)))
        first = evals[0]
        info(f"eval at step {last['step']}: {shown}" + (f" (step {first['step']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in first["eval"].items() if isinstance(v, (int, float))) + ")"
            if first is not last else ""), quiet)
    info(f"metrics: {Path(out) / 'metrics.jsonl'}; options and versions: {Path(out) / 'config.json'}", quiet)
    if plot:
        from ovsam_model.train.plot import PlotError, plot_runs

        try:
            info(f"curves: {plot_runs([Path(out)], Path(out) / 'curves.png')}", quiet)
        except PlotError as e:
            info(f"warning: no curves drawn: {e}", quiet)
