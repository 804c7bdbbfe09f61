"""Base/novel splits used by the evaluators: COCO 48/17 as in spec §7, LVIS r/c/f from `frequency`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ovsam_model.splits import COCO_BASE, COCO_EXCLUDED, COCO_NOVEL, coco_split_ids, lvis_split_ids

DATA = Path(os.environ.get("OVSAM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SPEC = DATA.parent / "docs" / "ovsam-spec.md"
MINI = DATA / "coco-val2017-mini" / "instances.json"
LVIS_INFO = DATA / "clip-text-embeddings" / "lvis_v1_train_cat_info.json"


def _spec_list(text: str, start: str, stop: str) -> list[str]:
    body = re.sub(r"\s+", " ", text.split(start, 1)[1].split(stop, 1)[0])
    return [n.strip(" .;") for n in body.split(",") if n.strip(" .;")]


@pytest.mark.skipif(not SPEC.is_file(), reason=f"spec absent: {SPEC}")
def test_coco_lists_match_spec():
    text = SPEC.read_text()
    section = text.split("## 7.", 1)[1]
    novel = _spec_list(section, "novel = ", "; base = ")
    base = _spec_list(section, "; base = ", ". The other 15")
    excluded = _spec_list(section, "The other 15 (", ") are left out")
    assert list(COCO_NOVEL) == novel and len(novel) == 17
    assert list(COCO_BASE) == base and len(base) == 48
    assert sorted(COCO_EXCLUDED) == sorted(excluded) and len(excluded) == 15


@pytest.mark.skipif(not MINI.is_file(), reason=f"test data absent: {MINI}")
def test_coco_split_ids_cover_the_80_classes():
    cats = json.loads(MINI.read_text())["categories"]
    base, novel = coco_split_ids(cats)
    by_id = {c["id"]: c["name"] for c in cats}
    assert [by_id[i] for i in base] == list(COCO_BASE)
    assert [by_id[i] for i in novel] == list(COCO_NOVEL)
    rest = set(by_id) - set(base) - set(novel)
    assert sorted(by_id[i] for i in rest) == sorted(COCO_EXCLUDED)


@pytest.mark.skipif(not LVIS_INFO.is_file(), reason=f"test data absent: {LVIS_INFO}")
def test_lvis_split_from_frequency():
    cats = json.loads(LVIS_INFO.read_text())
    base, novel = lvis_split_ids(cats)
    assert len(base) == 866 and len(novel) == 337  # spec §7
    freq = {c["id"]: c["frequency"] for c in cats}
    assert {freq[i] for i in novel} == {"r"} and {freq[i] for i in base} == {"c", "f"}
    with pytest.raises(ValueError, match="frequency"):
        lvis_split_ids([{"id": 1, "name": "x"}])
