"""The `ovsam` command: global options, then one sub-command module per job."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer
from rich.logging import RichHandler

from ovsam_cli.common import err_console
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
    logging.basicConfig(level=level, format="%(message)s", force=True,
                        handlers=[RichHandler(console=err_console, show_path=verbose > 1)])


# --- sub-commands: register new ones here ----------------------------------------------------
app.add_typer(weights_app, name="weights")


if __name__ == "__main__":
    app()
