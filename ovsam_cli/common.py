"""Shared CLI pieces: the stderr console, one-line failures, reusable weight options."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console

# Humans read stderr; stdout is for machine output (tables, paths, JSON).
err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red line on stderr and exit with `code`."""
    err_console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def info(message: str, quiet: bool = False) -> None:
    """A progress/status line for humans (stderr), silenced by --quiet."""
    if not quiet:
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors(code: int = 2) -> Iterator[None]:
    """Turn the library's expected failures into one-line `fail` messages, not tracebacks."""
    from ovsam_model.checkpoint import CheckpointError
    from ovsam_model.registry import UnknownModelError
    from ovsam_model.weights import WeightsError

    try:
        yield
    except (WeightsError, CheckpointError, UnknownModelError) as e:
        fail(str(e), code)
    except FileNotFoundError as e:
        fail(f"file not found: {e.filename or e}", code)
    except OSError as e:  # permissions, full disk: the user's to fix, not a traceback
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), code)
    except typer.BadParameter as e:
        fail(e.format_message(), code)


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
                 help="Use a local weight file for one component, e.g. clip2sam=./clip2sam_coco_rn50x16.pth "
                      "(repeatable; see `ovsam weights list`)."),
]
ClipWeightsOpt = Annotated[
    Optional[Path],
    typer.Option("--clip-weights", metavar="FILE", dir_okay=False,
                 help="Local open_clip weights for the CLIP trunk instead of open_clip's cache."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda, cuda:1, ...")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status lines on stderr.")]


def offline_flag(offline: bool) -> Optional[bool]:
    """--offline given → True; not given → None (the library then reads the environment)."""
    return True if offline else None
