"""What a prompt source is: something that yields the prompts of each image of a run.

A source reads its input (a detector file, a click file, a list of dicts, a grid generator, ...),
checks each record against the run's images and categories (`SourceContext`), and returns a
`PromptSet`: the kept prompts per image in input order, and what was dropped, counted by reason
with the first few records named. Reading happens before any model is built, so input mistakes
stop a run at once.

A new source is one new module in this package defining a subclass with an `option` name: the
keyword of `label_images` and the `--OPTION` of `ovsam label` that select it. The engine asks
the source which images a run covers (`run_image_ids`), what workers make of each decoded image
(`preparer`) and how a batch of them becomes records (`label_batch`); the defaults are those of
a source of per-image prompts (one record per prompt), and a source that makes its own prompts
from the pixels (segment-everything) overrides them.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

from ovsam_model.io.detections import PromptSet

if TYPE_CHECKING:
    from ovsam_model.io.datasets import ImageRecord


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
    all_image_ids: Callable[[], list[int]] = list  # every image of --images / --ann, sorted


class PromptSource(abc.ABC):
    """Per-image prompts for a labeling run."""

    option: ClassVar[str] = ""
    unit: ClassVar[str] = "records"  # what the input is made of, in the summary ("skipped 3 of 40 records")
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

    # --- how the engine runs it (defaults: per-image prompt records) -------------------------

    def run_image_ids(self, prompts: PromptSet, image_ok: Callable[[int], bool]) -> list[int]:
        """The run's images, sorted: those with kept prompts, and readable ones (`image_ok`)
        whose records were all filtered out (formats that list images list them, unlabeled)."""
        filtered = {i for i in prompts.image_ids - set(prompts.by_image) if image_ok(i)}
        return sorted(set(prompts.by_image) | filtered)

    def count(self, prompts: PromptSet, image_id: int) -> int:
        """Prompts decoded for the image (progress and summary)."""
        return len(prompts.by_image.get(image_id, ()))

    def skip_count(self, prompts: PromptSet, image_id: int) -> int:
        """What the summary counts as dropped when the image cannot be used: its input records."""
        return self.count(prompts, image_id)

    def fingerprint(self, prompts: PromptSet) -> dict[str, Any]:
        """What the output depends on, input-wise, by the option names a user changes."""
        return {"prompts (input file, --score-thr, --max-dets, --ann)": prompts_digest(prompts)}

    def preparer(self, predictor: Any) -> Callable[[Any], Any]:
        """What DataLoader workers make of each decoded HxWx3 uint8 image (picklable)."""
        return predictor.prepare

    def label_batch(self, predictor: Any, images: Sequence["ImageRecord"], prepared: Sequence[Any],
                    prompts: PromptSet, *, category_ids: Sequence[int], label_source: str) -> list[list[dict]]:
        """The records of each image of a batch (`prepared`: what `preparer` made of it)."""
        from ovsam_model.io.detections import prompts_for

        from ..records import build_records

        kept = [prompts.by_image.get(image.id, []) for image in images]
        predictions = predictor.predict_prepared(list(prepared), [prompts_for(k) for k in kept], mask_format="rle")
        return [build_records(image, k, prediction, category_ids=category_ids, label_source=label_source)
                for image, k, prediction in zip(images, kept, predictions)]


def prompts_digest(prompts: PromptSet) -> str:
    """A digest of the kept prompts: what the part files' contents depend on, input-wise."""
    h = hashlib.sha256()
    for image_id in sorted(prompts.by_image):
        for p in prompts.by_image[image_id]:
            h.update(json.dumps([p.index, p.image_id, p.score, p.category_id, p.box, p.points, p.point_labels]).encode())
    return h.hexdigest()[:32]
