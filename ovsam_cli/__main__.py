"""`python -m ovsam_cli`."""

from ovsam_cli.main import run

run()
