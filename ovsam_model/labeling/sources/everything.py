"""Segment and name everything: no prompt file; every image of the run gets a grid of clicks.

`--everything` labels every image of `--images` (or of `--ann`): the grid, crops, stability and
NMS filtering are `ovsam_model.everything`'s; this source only tells the engine which images a
run covers and turns each image's masks into records (`iter_everything_records`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional, Sequence, Union

from ovsam_model.io.detections import InputError, PromptSet

from .base import PromptSource, SourceContext


class EverythingSource(PromptSource):
    """Every image, a `points_per_side`² grid of single positive clicks (see `EverythingSettings`:
    `settings` is one, True for the defaults, or a dict of its fields)."""

    option = "everything"
    unit = "images"

    def __init__(self, settings: Union[bool, dict, Any] = True) -> None:
        from ovsam_model.everything import EverythingSettings

        if settings is True or settings is None:
            settings = EverythingSettings()
        elif isinstance(settings, dict):
            try:
                settings = EverythingSettings(**settings)
            except TypeError as exc:
                raise InputError(f"everything settings: {exc}") from None
        if not isinstance(settings, EverythingSettings):
            raise InputError(f"everything= takes True, a dict or an EverythingSettings, got {type(settings).__name__}")
        try:
            self.settings = settings.check()
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self._generators: dict[int, Any] = {}

    def read(self, *, strict: bool = False, require_category: bool = False) -> Optional[set[int]]:
        if require_category:
            raise InputError("--everything names every mask with the model: it cannot take --label-source detector")
        return None

    def load(self, ctx: SourceContext) -> PromptSet:
        self.read(strict=ctx.strict, require_category=ctx.require_category)
        ids = ctx.all_image_ids()
        if not ids:
            raise InputError("--everything found no images to label: --images has no image files (.jpg, .png, ...) "
                             "and --ann lists none")
        prompts = PromptSet(total=len(ids), image_ids=set(ids))
        for image_id in ids:
            if ctx.image_size(image_id) is None:
                prompts.skip(ctx.missing_reason(image_id), f"image_id {image_id}")
        return prompts

    def describe(self) -> str:
        return "--everything"

    def run_image_ids(self, prompts: PromptSet, image_ok: Callable[[int], bool]) -> list[int]:
        return sorted(i for i in prompts.image_ids if image_ok(i))

    def count(self, prompts: PromptSet, image_id: int) -> int:
        return self.settings.points_per_image()

    def skip_count(self, prompts: PromptSet, image_id: int) -> int:
        return 1  # the image is the input

    def fingerprint(self, prompts: PromptSet) -> dict[str, Any]:
        images = hashlib.sha256(json.dumps(sorted(prompts.image_ids)).encode()).hexdigest()[:32]
        return {**self.settings.options(), "images (--images, --ann)": images}

    def preparer(self, predictor: Any) -> Callable[[Any], Any]:
        from ovsam_model.everything import everything_preparer

        return everything_preparer(predictor, self.settings)

    def label_batch(self, predictor: Any, images: Sequence[Any], prepared: Sequence[Any], prompts: PromptSet, *,
                    category_ids: Sequence[int], label_source: str) -> list[list[dict]]:
        from ovsam_model.everything import EverythingGenerator, iter_everything_records

        generator = self._generators.get(id(predictor))
        if generator is None:
            generator = self._generators[id(predictor)] = EverythingGenerator(predictor, self.settings)
        masks = generator.generate_prepared(prepared)
        return [list(iter_everything_records(m, image.id, category_ids)) for image, m in zip(images, masks)]
