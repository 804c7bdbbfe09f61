"""`ovsam label --everything` user mistakes and summaries found by an audit of the multi-process
and segment-everything paths: each is one line on stderr (never a traceback or a hang), and an
image found unusable while labeling is named in the summary like one found unusable before."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ovsam_cli.main import app
from ovsam_model.everything import EverythingSettings

from test_cli_label import cached_model, mini  # noqa: F401  (fixtures: cached tiny models, the mini-val data)
from test_everything import label


@pytest.mark.parametrize("args,message", [
    (["--points-per-side", "100000"], "--points-per-side 100000 with --crop-n-layers 0 makes 10000000000 clicks"),
    (["--crop-n-layers", "40"], "--crop-n-layers must be at most 5"),
    (["--crop-n-layers", "1000000000", "--crop-n-points-downscale-factor", "2"], "--crop-n-layers must be at most 5"),
    (["--points-per-side", "1024", "--crop-n-layers", "2"], "clicks per image"),
    (["--max-dets", "3"], "--max-dets applies to --boxes and --points only (--everything: --max-masks)"),
    (["--score-thr", "0.5"], "--score-thr applies to --boxes and --points only"),
])
def test_grids_too_large_and_prompt_file_options_are_one_line_errors(mini, tmp_path, args, message):
    root, _, ids, _ = mini
    folder = tmp_path / "imgs"  # one image, a small grid: without the checks, a run would start (and finish)
    folder.mkdir()
    (folder / "1.jpg").write_bytes((root / "images" / f"{ids[0]:012d}.jpg").read_bytes())
    r = CliRunner().invoke(app, ["label", "--everything", "--model", "tiny", "--workers", "0", "--images", str(folder),
                                 "--points-per-side", "4", "--out", str(tmp_path / "o.json"), *args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


def test_largest_accepted_settings_stay_accepted():
    assert EverythingSettings(points_per_side=2048).problems() == []
    assert EverythingSettings(points_per_side=32, crop_n_layers=5).problems() == []
    assert EverythingSettings(points_per_side=1024, crop_n_layers=2, crop_n_points_downscale_factor=2).problems() == []


def test_an_image_that_fails_to_decode_is_named_in_the_summary(cached_model, mini, tmp_path):
    """A truncated JPEG has a readable header (it is listed with its size) but fails in the
    loader: the summary names it, as it names an image whose header is unreadable."""
    root, _, ids, _ = mini
    folder = tmp_path / "imgs"
    folder.mkdir()
    jpeg = (root / "images" / f"{ids[0]:012d}.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(jpeg)
    (folder / "2.jpg").write_bytes(jpeg[:3000])
    r = label("--images", folder, "--out", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    assert "skipped 1 of 2 images: image file missing or corrupt: 1 (image_id 2)" in r.output, r.output
