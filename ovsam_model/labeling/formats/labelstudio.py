"""Label Studio tasks JSON with the masks as pre-annotations (`predictions`).

One task per labeled image (images that could not be read are left out; an image without
records gets a task with no prediction), in image-id order:

    {"data": {"image": IMAGE_ROOT + quote(file_name), "image_id": 139, "file_name": "..."},
     "predictions": [{"model_version": "...", "score": <highest region score>, "result": [
        {"id": "r0", "from_name": "label", "to_name": "image", "type": "brushlabels",
         "original_width": W, "original_height": H, "image_rotation": 0, "score": 0.93,
         "value": {"format": "rle", "rle": [...], "brushlabels": ["person"]}}, ...]}]}

Masks are brush regions in Label Studio's own RLE, encoded by label-studio-sdk's converter
(`label_studio_sdk.converter.brush.mask2rle`, mask value 255): exact, holes and parts included.
With `segmentation="polygons"` (`--polygons`) each mask becomes `polygonlabels` regions, one per
outer contour (`io.masks.mask_polygons`; Label Studio polygons have no holes), with points in
percent of the image size (`x / width * 100`). The labeling config that matches: an `<Image
name="image" value="$image"/>` and a `<BrushLabels>` (or `<PolygonLabels>`) named `label` with one
`<Label value=...>` per category (`label_config`).

IMAGE_ROOT defaults to `/data/local-files/?d=`: Label Studio's local-files serving, with
`LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` set to the images folder. Any URL prefix works
(`https://bucket.example/val2017/`, `s3://bucket/imgs/`); the file name is URL-quoted.
"""

from __future__ import annotations

from typing import Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from ovsam_model.io.detections import InputError

from ..records import Entry
from .base import JsonFileFormat

DEFAULT_IMAGE_ROOT = "/data/local-files/?d="
FROM_NAME, TO_NAME = "label", "image"
INSTALL_HINT = "--format labelstudio needs label-studio-sdk: pip install 'ovsam[labelstudio]' (or label-studio-sdk)"


def brush_encoder():
    """label-studio-sdk's `mask2rle`, or ImportError with the install command."""
    try:
        from label_studio_sdk.converter.brush import mask2rle
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return mask2rle


class LabelStudioTasks(JsonFileFormat):
    """Label Studio tasks with predictions: brush RLE (default) or polygons in percent."""

    name = "labelstudio"
    help = "Label Studio tasks JSON with predictions (brush masks, or polygons with --polygons)"

    def __init__(self, *, segmentation: str = "rle", image_root: str = DEFAULT_IMAGE_ROOT,
                 model_version: str = "ovsam") -> None:
        super().__init__(segmentation=segmentation)
        self.image_root = image_root
        self.model_version = model_version
        self.dropped = 0  # records whose mask gave no region
        if segmentation == "rle":
            self._mask2rle = brush_encoder()  # fails before any work when the SDK is missing

    def open_document(self, categories: Sequence[dict]) -> None:
        self.names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        self.tasks = 0
        self.write("[")

    def add(self, entry: Entry) -> None:
        if entry.get("skipped"):
            for _ in entry["records"]:
                pass
            return
        image = entry["image"]
        regions: list[dict] = []
        scores: list[float] = []
        for record in entry["records"]:
            label = self.names.get(int(record["category_id"]))
            if label is None:
                raise InputError(f"image {image['id']}: category_id {record['category_id']} is not among the "
                                 f"categories")
            made = self._regions(record, label, image["height"], image["width"], len(regions))
            if not made:  # an empty mask, or one too small for a polygon
                self.dropped += 1
                continue
            regions.extend(made)
            self.count += 1
            if "score" in record:
                scores.append(float(record["score"]))
        task: dict = {"data": {"image": self.image_root + quote(image["file_name"], safe="/"),
                               "image_id": image["id"], "file_name": image["file_name"]}, "predictions": []}
        if regions:
            prediction: dict = {"model_version": self.model_version, "result": regions}
            if scores:
                prediction["score"] = max(scores)
            task["predictions"].append(prediction)
        self.write(("," if self.tasks else "") + self.dumps(task))
        self.tasks += 1

    def _regions(self, record: dict, label: str, height: int, width: int, first: int) -> list[dict]:
        base = {"from_name": FROM_NAME, "to_name": TO_NAME, "original_width": width, "original_height": height,
                "image_rotation": 0}
        if "score" in record:
            base["score"] = float(record["score"])
        from ovsam_model.io.masks import decode_rle, mask_polygons

        if self.segmentation == "rle":
            mask = decode_rle(record["segmentation"]).astype("uint8") * 255
            if not mask.any():
                return []
            return [{"id": f"r{first}", **base, "type": "brushlabels",
                     "value": {"format": "rle", "rle": [int(v) for v in self._mask2rle(mask)], "brushlabels": [label]}}]
        regions = []
        for polygon in mask_polygons(record["segmentation"]):
            points = _percent(polygon, width, height)
            regions.append({"id": f"r{first + len(regions)}", **base, "type": "polygonlabels",
                            "value": {"points": points, "closed": True, "polygonlabels": [label]}})
        return regions

    def close_document(self) -> None:
        self.write("]")


def _percent(polygon: Sequence[float], width: int, height: int) -> list[list[float]]:
    """[x1, y1, x2, y2, ...] in pixels → [[x%, y%], ...] in [0, 100], 4 decimals."""
    import numpy as np

    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) / [width, height] * 100.0
    return np.round(np.clip(points, 0.0, 100.0), 4).tolist()


def label_config(categories: Sequence[dict], polygons: bool = False) -> str:
    """The Label Studio labeling config (XML) that the tasks' regions fit."""
    tag = "PolygonLabels" if polygons else "BrushLabels"
    labels = "\n".join(f"    <Label value={quoteattr(str(c.get('name', c['id'])))}/>"
                       for c in sorted(categories, key=lambda c: int(c["id"])))
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n  <{tag} name="{FROM_NAME}" toName="{TO_NAME}">\n'
            f"{labels}\n  </{tag}>\n</View>\n")
