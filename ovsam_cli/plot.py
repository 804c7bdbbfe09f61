"""`ovsam plot`: training curves of one or more `ovsam distill` / `ovsam finetune` runs.

The folders and the output are checked before matplotlib is imported; reading the logs and
drawing live in `ovsam_model.train.plot`. The written image's path is the only stdout output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ovsam_cli.common import CliError, user_errors
from ovsam_model.train.plot import DEFAULT_OUTPUT, IMAGE_FORMATS, PlotError, check_run_dir  # no matplotlib


def plot(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN", show_default=False,
        help="Training output folders (the --out of ovsam distill / finetune), each with its metrics.jsonl. Several "
             "runs share the same panels, one colour per run.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", metavar="FILE", dir_okay=False,
        help=f"Image to write: {', '.join(IMAGE_FORMATS)} by its suffix; replaced atomically. Default: "
             f"FIRST_RUN/{DEFAULT_OUTPUT}.")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Title above the panels (default: none).")] = None,
) -> None:
    """Draw the training curves of runs from their metrics.jsonl: the loss and each loss term (log scale when all
    positive), the learning rate, the gradient norm and throughput, and the evaluations (one panel per metric
    family: mse*, iou*, acc*). The legend names each run folder, with the model from its config.json. Prints the
    image's path.
    """
    with user_errors(also=(PlotError,)):
        for run in runs:
            check_run_dir(run)
        target = out if out is not None else runs[0] / DEFAULT_OUTPUT
        if target.suffix.lower() not in IMAGE_FORMATS:
            raise CliError(f"--out {target}: unknown image format {target.suffix or '(no suffix)'} "
                           f"(use {', '.join(IMAGE_FORMATS)})")
        if target.is_dir():
            raise CliError(f"--out {target}: is a folder")
        if not target.parent.is_dir():
            raise CliError(f"--out {target}: folder {target.parent} does not exist")
        from ovsam_model.train.plot import plot_runs

        path = plot_runs(runs, target, title)
    typer.echo(str(path))
