"""Shared fixtures: the real test data folder, the `gpu` marker, a randomly initialised OVSAM."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("OVSAM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real test data (env `OVSAM_TEST_DATA`, default `<repo>/../shared/data`)."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"test data not found at {path} (set OVSAM_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def keys_dir(data_dir: Path) -> Path:
    """The official state-dict layouts (`ovsam-keys/*.json`)."""
    path = data_dir / "ovsam-keys"
    if not path.is_dir():
        pytest.skip(f"no ovsam-keys layouts in {data_dir}")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_random_ovsam(name: str = "ovsam-rn50x16-coco"):
    """The full-size model with random weights: through `ovsam_model.builder` when it exists,
    else the composition root directly. Skips when neither is importable."""
    if importlib.util.find_spec("ovsam_model.builder") is not None:
        from ovsam_model.builder import build_model

        return build_model(name, random_weights=True)
    if importlib.util.find_spec("ovsam_model.modeling.ovsam") is None:
        pytest.skip("ovsam_model.modeling is not available")
    from ovsam_model.modeling.ovsam import OVSAM
    from ovsam_model.registry import get_spec

    return OVSAM.from_config(get_spec(name).config)


@pytest.fixture(scope="session")
def random_ovsam():
    """One full-size RN50x16 OVSAM with random weights, shared by the tests (≈2.5 GB, ~7 s)."""
    return build_random_ovsam()


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same torch RNG state, so no result depends on test order."""
    torch.manual_seed(0)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on `n` intra-op threads for the block (CPU kernels round by thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on the 2 cores shared with other jobs, OpenMP's barriers made many small or mid-sized operations
    slower on two threads than on one (the tiny trunk's convolutions up to 100x)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mini_gt_boxes(data_dir: Path):
    """(images, prompts): the first three coco-val2017-mini images (RGB uint8) and up to 12 of
    their ground-truth boxes each (XYXY, float32)."""
    import json

    import numpy as np
    from PIL import Image

    from ovsam_model.types import Prompts

    mini = data_dir / "coco-val2017-mini"
    gt = json.loads((mini / "instances.json").read_text())
    images, prompts = [], []
    for im in gt["images"][:3]:
        boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == im["id"]][:12]
        images.append(np.array(Image.open(mini / "images" / im["file_name"]).convert("RGB")))
        prompts.append(Prompts(boxes=torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32)))
    return images, prompts


def mask_ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of masks a[i] and b[i] ([N, H, W] bool) → [N]; two empty masks count as IoU 1."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def agreement(preds, refs) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask IoU per prompt, whether the top-1 label is the same) of two predictors' outputs on
    the same prompts; two empty masks count as IoU 1."""
    ious = [mask_ious(p.masks, r.masks) for p, r in zip(preds, refs)]
    same = [p.labels == r.labels for p, r in zip(preds, refs)]
    return torch.cat(ious), torch.cat(same)
