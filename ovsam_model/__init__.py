"""Open-Vocabulary SAM model library (no CLI code here).

`label_images` and `open_labeler` (the labeling engine, `ovsam_model.labeling`) are imported
on first use, so `import ovsam_model` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("label_images", "open_labeler", "Labeler", "LabelSummary"):
        from . import labeling

        return getattr(labeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
