"""The review folder of `ovsam show`: overlays, grid pages, one page per image, the review queue
and per-class counts, as static files that open from disk in any browser (no server, no network).

    from ovsam_model.review import build_review, ReviewOptions
    build_review("labeled.json", "val2017/", "review/", ann="instances_val2017.json",
                 gt="instances_val2017.json", options=ReviewOptions(page_size=200))

Modules: `build` (the folder, written atomically), `labels` (what a record shows, the queue),
`match` (predictions against ground truth), `overlay` (supervision annotators), `html` and
`assets` (pages, style, the filter script).
"""

from .build import MARKER, ReviewEvents, ReviewOptions, ReviewSummary, build_review, check_out

__all__ = ["MARKER", "ReviewEvents", "ReviewOptions", "ReviewSummary", "build_review", "check_out"]
