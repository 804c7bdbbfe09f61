"""Starting `ovsam` is cheap: argument and file mistakes are reported before torch is imported,
and output that does not go to a terminal is never wrapped or cut to 80 columns."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "segment_anything")

# The installed entry point, reporting on stdout's last line which heavy modules were imported.
_RUN = """
import sys
sys.argv = ["ovsam", *sys.argv[1:]]
try:
    from ovsam_cli.main import run
    run()
finally:
    print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
""".format(heavy=HEAVY)


def _ovsam(*args: str, env: dict | None = None) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout without the report line, stderr, heavy modules imported)."""
    proc = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    *out, report = proc.stdout.splitlines() or [""]
    assert report.startswith("HEAVY:"), proc.stdout + proc.stderr
    heavy = [m for m in report[len("HEAVY:"):].split(",") if m]
    return proc.returncode, "\n".join(out), proc.stderr, heavy


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startup")
    (root / "images").mkdir()
    (root / "empty").mkdir()
    ann = root / "gt.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return {"root": root, "images": root / "images", "empty": root / "empty", "ann": ann,
            "missing": root / "missing.json", "missing_dir": root / "missing_dir", "out": root / "out"}


CASES = {
    "eval: no --ann file": (lambda f: ["eval", "--ann", f["missing"], "--pred", f["ann"]],
                            "ground-truth file not found"),
    "eval: no --pred file": (lambda f: ["eval", "--ann", f["ann"], "--pred", f["missing"]],
                             "prediction file not found"),
    "eval: detector without --pred": (lambda f: ["eval", "--ann", f["ann"]], "needs --pred"),
    "eval: prompt, no --images folder": (lambda f: ["eval", "--protocol", "prompt", "--ann", f["ann"], "--images",
                                                    f["missing_dir"], "--model", "tiny"], "images folder not found"),
    "eval: prompt without --model": (lambda f: ["eval", "--protocol", "prompt", "--ann", f["ann"], "--images",
                                                f["images"]], "needs --images DIR and --model"),
    "distill: no --images folder": (lambda f: ["distill", "--images", f["missing_dir"], "--out", f["out"]],
                                    "no such folder"),
    "distill: a baseline": (lambda f: ["distill", "--images", f["images"], "--out", f["out"], "--model",
                                       "baseline-image-crop"], "is a baseline"),
    "distill: unknown model": (lambda f: ["distill", "--images", f["images"], "--out", f["out"], "--model", "nope"],
                               "unknown model 'nope'"),
    "distill: sam weights for the tiny teacher": (
        lambda f: ["distill", "--images", f["images"], "--out", f["out"], "--teacher", "tiny",
                   "--checkpoint", f"sam={f['ann']}"], "vit_h teacher's"),
    "finetune: no --ann file": (lambda f: ["finetune", "--ann", f["missing"], "--images", f["images"], "--out",
                                           f["out"]], "no such file"),
    "finetune: no --images folder": (lambda f: ["finetune", "--ann", f["ann"], "--images", f["missing_dir"], "--out",
                                                f["out"]], "no such folder"),
    "finetune: bad --milestones": (lambda f: ["finetune", "--ann", f["ann"], "--images", f["images"], "--out",
                                              f["out"], "--milestones", "8,x"], "--milestones"),
    "finetune: --resize-min above --resize-max": (
        lambda f: ["finetune", "--ann", f["ann"], "--images", f["images"], "--out", f["out"],
                   "--resize-min", "3", "--resize-max", "2"], "larger than --resize-max"),
    "finetune: --flip above 1": (lambda f: ["finetune", "--ann", f["ann"], "--images", f["images"], "--out",
                                            f["out"], "--flip", "1.5"], "Invalid value for '--flip'"),
    "finetune: bad --checkpoint": (lambda f: ["finetune", "--ann", f["ann"], "--images", f["images"], "--out",
                                              f["out"], "--checkpoint", "head=x.pth"], "unknown component 'head'"),
    "weights verify: no file of the model": (
        lambda f: ["weights", "verify", "--model", "ovsam-rn50x16-coco", "--weights-dir", f["empty"]],
        "no weight file of ovsam-rn50x16-coco"),
    "weights download: unknown model": (lambda f: ["weights", "download", "nope"], "unknown model 'nope'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mistakes_are_reported_before_torch_is_imported(case, files):
    make_args, message = CASES[case]
    code, out, err, heavy = _ovsam(*map(str, make_args(files)))
    assert code != 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert heavy == [], f"{case}: imported {heavy}"


def test_version_and_a_list_without_clip_import_no_torch(tmp_path):
    code, out, err, heavy = _ovsam("--version")
    assert code == 0 and out.startswith("ovsam ") and heavy == [], err
    env = {**os.environ, "OVSAM_CACHE_DIR": str(tmp_path)}
    code, out, err, heavy = _ovsam("weights", "list", "--model", "tiny", "--format", "tsv", env=env)
    assert code == 0 and out.splitlines()[0].startswith("model\t") and heavy == [], err


# --- output to a pipe or a file: never wrapped, never cut ------------------------------------------

def test_weights_table_through_a_pipe_keeps_every_row_whole(tmp_path):
    """`ovsam weights list | grep lvis` finds every lvis row, whole, on one line; the table is as
    wide as its content (not padded to the console width)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(OVSAM_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ovsam_cli", "weights", "list"]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    rows = json.loads(subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, timeout=120,
                                     env=env, cwd=REPO).stdout)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "…" not in table.stdout
    assert max(len(line) for line in lines) < 200  # the content's width, not the console's
    lvis = [line for line in lines if "ovsam-rn50x16-lvis" in line]
    assert any("clip2sam" in line and "clip2sam_lvis_rn50x16.pth" in line for line in lvis), table.stdout
    for row in rows:  # every row of the JSON listing is one line of the table
        assert any(row["model"] in line and f" {row['component']} " in line and row["file"] in line
                   for line in lines), row


def _pipe_stderr(monkeypatch) -> io.StringIO:
    """sys.stderr replaced by a buffer (not a terminal), with no COLUMNS in the environment.
    (In the test itself: pytest puts its own capture back between a fixture and the test.)"""
    for var in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    return buffer


def test_long_warnings_are_not_wrapped(monkeypatch):
    from ovsam_cli import common

    piped_stderr = _pipe_stderr(monkeypatch)

    path = "/data/" + "x" * 200 + "/image.jpg"
    common.info(f"warning: cannot read {path}")
    common.err_console.print(f"warning: {path} is empty", style="yellow", markup=False, highlight=False)
    handler = common.log_handler(verbose=0)
    handler.handle(logging.LogRecord("ovsam", logging.WARNING, __file__, 1, "cached %s is corrupt", (path,), None))
    assert piped_stderr.getvalue().splitlines() == [f"warning: cannot read {path}", f"warning: {path} is empty",
                                                    f"WARNING cached {path} is corrupt"]


def test_terminal_and_explicit_columns_keep_rich_widths(monkeypatch):
    """On a terminal, or with COLUMNS set, the consoles lay out as rich does."""
    from ovsam_cli import common

    _pipe_stderr(monkeypatch)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert common.err_console.width == common.UNWRAPPED_WIDTH
    monkeypatch.setenv("COLUMNS", "100")
    assert common.err_console.width == 100  # an explicit width is kept
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert common.out_console.width == 100
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert type(common.log_handler(0)).__name__ == "RichHandler"
