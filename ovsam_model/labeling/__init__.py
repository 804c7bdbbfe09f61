"""The labeling engine: prompt sources → predictor → records → resumable part files → formats.

Python API: `label_images(...)` writes an output file and returns a `LabelSummary`;
`open_labeler(...)` returns a `Labeler` whose `entries()` yields labeled images one at a time.
"""

from .api import ModelSettings, check_inputs, label_images, load_predictor, open_labeler
from .engine import LabelEvents, Labeler, LabelSummary
from .formats import OutputFormat, format_names, get_format
from .sources import PromptSource, SourceContext, make_source, source_options

__all__ = [
    "LabelEvents", "LabelSummary", "Labeler", "ModelSettings", "OutputFormat", "PromptSource", "SourceContext",
    "check_inputs", "format_names", "get_format", "label_images", "load_predictor", "make_source", "open_labeler",
    "source_options",
]
