"""The `ovsam` command: global options, then one sub-command module per job.

Importing this module (and so starting `ovsam`) imports no torch: each command imports the
model code inside its function, after checking its arguments (see `ovsam_cli.common`).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer

from ovsam_cli.common import SIGPIPE_EXIT, err_console, exit_broken_pipe, log_handler
from ovsam_cli.convert import convert
from ovsam_cli.distill import distill
from ovsam_cli.eval import eval_command
from ovsam_cli.finetune import finetune
from ovsam_cli.label import label
from ovsam_cli.plot import plot
from ovsam_cli.show import show
from ovsam_cli.weights import app as weights_app

app = typer.Typer(
    name="ovsam",
    no_args_is_help=True,
    help="Open-Vocabulary SAM for dataset labeling: boxes or clicks in, masks and open-vocabulary labels out.",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from ovsam_model import __version__

        typer.echo(f"ovsam {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output on stderr: -v info, -vv debug.")] = 0,
) -> None:
    """Open-Vocabulary SAM command line."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", force=True, handlers=[log_handler(verbose)])


# --- sub-commands: register new ones here ----------------------------------------------------
app.command("label", no_args_is_help=True)(label)
app.command("eval", no_args_is_help=True)(eval_command)
app.command("distill", no_args_is_help=True)(distill)
app.command("finetune", no_args_is_help=True)(finetune)
app.command("plot", no_args_is_help=True)(plot)
app.command("show", no_args_is_help=True)(show)
app.command("convert", no_args_is_help=True)(convert)
app.add_typer(weights_app, name="weights")


def _is_click_error(exc: BaseException) -> bool:
    """Click's usage/parameter errors (Typer may vendor its own click, so match by shape)."""
    return hasattr(exc, "format_message") and hasattr(exc, "exit_code") and hasattr(exc, "show")


def run() -> None:
    """Console entry point: like `app()`, but a usage mistake is one line on stderr, not a panel,
    and a reader closing stdout early (`| head`) ends the run quietly with exit code 141."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - only click's own errors are handled here
        if not _is_click_error(e):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # the help was already printed
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err_console.print(f"error: {e.format_message()}{hint}", style="red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(e.exit_code)
    except BaseException as e:
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if isinstance(e, SystemExit) and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            # typer/click met a closed stdout (EPIPE) outside our handlers (e.g. plain
            # `typer.echo` output) and exit 1 quietly: use our code for it
            try:
                exit_broken_pipe()
            except typer.Exit:
                sys.exit(SIGPIPE_EXIT)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
