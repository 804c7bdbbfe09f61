"""`ovsam` command line: thin Typer commands over `ovsam_model`."""
