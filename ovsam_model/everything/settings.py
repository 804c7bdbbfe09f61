"""Segment-everything's options (no torch: the CLI checks them before importing the model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# Beyond these an image would never finish (or its grid would not fit in memory): a typo such as
# --points-per-side 10000 or --crop-n-layers 40 is refused at once rather than hanging the run.
MAX_CLICKS_PER_IMAGE = 2**22  # 2048² clicks; segment-anything's default is 32² (with crop layers, a few ×)
MAX_CROP_LAYERS = 5  # layer i has 4^i crops: 1365 crops per image in all


@dataclass(frozen=True)
class EverythingSettings:
    """The generator's options, named as `SamAutomaticMaskGenerator`'s (the CLI adds dashes).

    max_masks: masks kept per image, best score first (0: all). min_label_prob: the lowest
    label probability kept. drop_background: drop a mask whose background probability beats
    its best class (False keeps every stable mask, e.g. for class-agnostic proposals). The
    others mean what they mean in segment-anything.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    min_label_prob: float = 0.0
    box_nms_thresh: float = 0.7
    crop_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    max_masks: int = 1000
    drop_background: bool = True

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each, naming the CLI option."""
        found = []
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                found.append(f"{option_name(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("crop_n_layers", "min_mask_region_area", "max_masks"):
            if getattr(self, name) < 0:
                found.append(f"{option_name(name)} must be 0 or more, got {getattr(self, name)}")
        for name in ("stability_score_thresh", "min_label_prob", "box_nms_thresh", "crop_nms_thresh"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                found.append(f"{option_name(name)} must be within [0, 1], got {value}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            found.append(f"{option_name('crop_overlap_ratio')} must be within [0, 1), got {self.crop_overlap_ratio}")
        if not self.stability_score_offset > 0.0:
            found.append(f"{option_name('stability_score_offset')} must be above 0, got {self.stability_score_offset}")
        factor, layers = self.crop_n_points_downscale_factor, self.crop_n_layers
        # no click on the last layer (a factor of 0 is refused above; more layers by `_size_problems`)
        if 0 < layers <= MAX_CROP_LAYERS and factor != 0 and self.points_per_side // factor**layers < 1:
            found.append(f"{option_name('crop_n_points_downscale_factor')} {self.crop_n_points_downscale_factor} leaves "
                         f"no points on crop layer {self.crop_n_layers} of a {self.points_per_side}-point grid")
        return found or self._size_problems()

    def _size_problems(self) -> list[str]:
        """Grids and crop layers too large to ever finish (checked once the values are valid)."""
        if self.crop_n_layers > MAX_CROP_LAYERS:
            return [f"{option_name('crop_n_layers')} must be at most {MAX_CROP_LAYERS} ({4**MAX_CROP_LAYERS} crops on "
                    f"the last layer), got {self.crop_n_layers}"]
        clicks = self.points_per_image()
        if clicks > MAX_CLICKS_PER_IMAGE:
            return [f"{option_name('points_per_side')} {self.points_per_side} with {option_name('crop_n_layers')} "
                    f"{self.crop_n_layers} makes {clicks} clicks per image (at most {MAX_CLICKS_PER_IMAGE})"]
        return []

    def check(self) -> "EverythingSettings":
        """Raise ValueError with the first problem; return self."""
        found = self.problems()
        if found:
            raise ValueError(found[0])
        return self

    def options(self) -> dict[str, Any]:
        """{--option: value}: what a run's output depends on (the resume fingerprint)."""
        options = {option_name(k): v for k, v in asdict(self).items()}
        options["--keep-background"] = not options.pop("--drop-background")
        return options

    def point_grids(self) -> list["np.ndarray"]:
        """Per crop layer, [n, 2] points in [0, 1]² (segment-anything's `build_all_layer_point_grids`)."""
        from segment_anything.utils.amg import build_all_layer_point_grids

        return build_all_layer_point_grids(self.points_per_side, self.crop_n_layers,
                                           self.crop_n_points_downscale_factor)

    def points_per_image(self) -> int:
        """Clicks decoded per image: every layer's grid times its crops (for progress counts)."""
        return sum((self.points_per_side // self.crop_n_points_downscale_factor**layer) ** 2 * (2**layer) ** 2
                   for layer in range(self.crop_n_layers + 1))


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")
