"""Regenerate `coco_categories.json` and `lvis_categories.json` from the shared test data.

Usage: python -m ovsam_model.data.make_category_files [DATA_DIR]
DATA_DIR defaults to $OVSAM_TEST_DATA or <repo>/../shared/data. Sources: COCO's 80 categories
from `coco-val2017-mini/instances.json`; LVIS v1's 1203 categories from Detic's
`lvis_v1_train_cat_info.json` (Apache-2.0). Only id, name, synonyms, frequency are kept.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _write_json(path: Path, records: list[dict]) -> None:
    """One record per line (readable diffs), written atomically."""
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def coco_records(instances_json: Path) -> list[dict]:
    cats = json.loads(instances_json.read_text())["categories"]
    out = [{"id": int(c["id"]), "name": c["name"], "supercategory": c["supercategory"]} for c in cats]
    if len(out) != 80:
        raise ValueError(f"{instances_json}: expected 80 COCO categories, found {len(out)}")
    return sorted(out, key=lambda c: c["id"])


def lvis_records(cat_info_json: Path) -> list[dict]:
    cats = json.loads(cat_info_json.read_text())
    out = [
        {"id": int(c["id"]), "name": c["name"], "synonyms": list(c["synonyms"]), "frequency": c["frequency"]}
        for c in cats
    ]
    out.sort(key=lambda c: c["id"])
    if [c["id"] for c in out] != list(range(1, 1204)):
        raise ValueError(f"{cat_info_json}: expected LVIS v1 ids 1..1203")
    return out


def main(data_dir: Path) -> None:
    _write_json(HERE / "coco_categories.json", coco_records(data_dir / "coco-val2017-mini" / "instances.json"))
    _write_json(
        HERE / "lvis_categories.json",
        lvis_records(data_dir / "clip-text-embeddings" / "lvis_v1_train_cat_info.json"),
    )


if __name__ == "__main__":
    default = os.environ.get("OVSAM_TEST_DATA", str(HERE.parents[1].parent / "shared" / "data"))
    main(Path(sys.argv[1] if len(sys.argv) > 1 else default))
