"""What a prompt source is: something that yields the prompts of each image of a run.

A source reads its input (a detector file, a click file, a list of dicts, a grid generator, ...),
checks each record against the run's images and categories (`SourceContext`), and returns a
`PromptSet`: the kept prompts per image in input order, and what was dropped, counted by reason
with the first few records named. Reading happens before any model is built, so input mistakes
stop a run at once.

A new source is one new module in this package defining a subclass with an `option` name: the
keyword of `label_images` and the `--OPTION` of `ovsam label` that select it.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

from ovsam_model.io.detections import PromptSet


@dataclass(frozen=True)
class SourceContext:
    """What a source checks its records against.

    image_size(image_id) → (H, W), or None when the image cannot be used; missing_reason gives
    the SkipReason to count then. category_ids: the known dataset ids (None: not known);
    check_categories: drop records of other ids; require_category: every record must carry one
    (label source "detector").
    """

    image_size: Callable[[int], Optional[tuple[int, int]]]
    missing_reason: Callable[[int], str]
    category_ids: Optional[Sequence[int]] = None
    check_categories: bool = True
    require_category: bool = False
    strict: bool = False


class PromptSource(abc.ABC):
    """Per-image prompts for a labeling run."""

    option: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["PromptSource"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.option:
            PromptSource.registry[cls.option] = cls

    def read(self, *, strict: bool = False, require_category: bool = False) -> Optional[set[int]]:
        """Parse the input and check its structure, before any model is built: raise `InputError`
        (one line) when it cannot be used at all. Returns the image ids it mentions (None: not
        known before `load`)."""
        return None

    @abc.abstractmethod
    def load(self, ctx: SourceContext) -> PromptSet:
        """The checked prompts of every image (calls `read` first if it has not run)."""

    def describe(self) -> str:
        """Where the prompts come from, for messages (e.g. "--boxes dets.json")."""
        return f"--{self.option}"


def prompts_digest(prompts: PromptSet) -> str:
    """A digest of the kept prompts: what the part files' contents depend on, input-wise."""
    h = hashlib.sha256()
    for image_id in sorted(prompts.by_image):
        for p in prompts.by_image[image_id]:
            h.update(json.dumps([p.index, p.image_id, p.score, p.category_id, p.box, p.points, p.point_labels]).encode())
    return h.hexdigest()[:32]
