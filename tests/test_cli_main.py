"""The installed entry point: every command is registered, usage mistakes are one line."""

from __future__ import annotations

import subprocess
import sys


def _ovsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovsam_cli", *args], capture_output=True, text=True, timeout=120)


def test_every_command_is_registered():
    res = _ovsam("--help")
    assert res.returncode == 0
    for command in ("label", "eval", "distill", "finetune", "weights"):
        assert command in res.stdout


def test_usage_mistakes_are_one_line_without_traceback():
    for args, hint in ((["label", "--boxes", "x.json", "--bogus"], "--bogus"),
                       (["eval", "--dataset", "coco"], "--ann"),
                       (["distill", "--images", "/nonexistent", "--out", "/tmp/x", "--epochs", "0"], "--epochs")):
        res = _ovsam(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and hint in lines[0], res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
