"""OVSAM modules, one per file; `ovsam.OVSAM` composes them."""
