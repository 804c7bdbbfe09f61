"""Image file names from a (possibly hostile) dataset JSON → output paths that stay inside the
output folder and never collide."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from ovsam_model.io.safe_paths import clean_relative_path, inside, safe_relative_path

HOSTILE = ["../evil.jpg", "../../../../etc/passwd", "/abs/x.jpg", "a\x00b.jpg", "C:\\Windows\\x.jpg",
           "\\\\server\\share\\y.jpg", "..\\..\\z.jpg", "./../.", "", "con.jpg", "d1/../../img.jpg",
           "a" * 400 + ".jpg", "x:y*z?.jpg", "trailing. ", "\x7f"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_stay_inside(tmp_path, name):
    path = safe_relative_path(name, set())
    assert not path.is_absolute() and ".." not in path.parts and path.parts
    assert all("\x00" not in p and "\\" not in p and ":" not in p and len(p) <= 200 for p in path.parts)
    assert inside(tmp_path, tmp_path / path)
    target = tmp_path / path  # the file can actually be written there
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("x")
    assert target.resolve().is_relative_to(tmp_path.resolve())


def test_examples_of_the_rules():
    assert clean_relative_path("../evil.jpg") == PurePosixPath("evil.jpg")
    assert clean_relative_path("/abs/x.jpg") == PurePosixPath("abs/x.jpg")
    assert clean_relative_path("a\x00b.jpg") == PurePosixPath("a_b.jpg")
    assert clean_relative_path("C:\\data\\x.jpg") == PurePosixPath("data/x.jpg")
    assert clean_relative_path("nul.txt") == PurePosixPath("_nul.txt")
    assert clean_relative_path("") == PurePosixPath("image")
    assert clean_relative_path("val2017/000000000139.jpg") == PurePosixPath("val2017/000000000139.jpg")
    long = clean_relative_path("b" * 300 + ".jpeg")
    assert long.suffix == ".jpeg" and len(long.name) == 200


def test_unique_case_insensitively_and_subfolders_kept():
    used: set[str] = set()
    names = ["A.jpg", "a.jpg", "a.JPG", "d1/img.jpg", "d2/img.jpg", "D1/IMG.jpg", "../a.jpg", "/a.jpg"]
    paths = [safe_relative_path(n, used) for n in names]
    assert paths[:6] == [PurePosixPath(p) for p in ("A.jpg", "a~2.jpg", "a~3.JPG", "d1/img.jpg", "d2/img.jpg",
                                                    "D1/IMG~2.jpg")]
    keys = [str(p).casefold() for p in paths]
    assert len(set(keys)) == len(keys)  # no two files the same, even on a case-insensitive disk


def test_a_file_and_a_folder_of_the_same_name():
    used: set[str] = set()
    first = safe_relative_path("x", used)
    second = safe_relative_path("x/y.jpg", used)  # folder x would be the file x
    third = safe_relative_path("X", used)
    assert first == PurePosixPath("x") and second == PurePosixPath("x__y.jpg") and third == PurePosixPath("X~2")
    used = set()
    safe_relative_path("q/r.jpg", used)
    assert safe_relative_path("Q", used) == PurePosixPath("Q~2")  # folder q holds r.jpg


def test_unique_stem_for_label_files():
    used: set[str] = set()
    paths = [safe_relative_path(n, used, unique_stem=True) for n in ("a.jpg", "a.png", "A.jpeg", "b.jpg")]
    stems = [str(p.with_suffix("")).casefold() for p in paths]
    assert len(set(stems)) == 4 and paths[0] == PurePosixPath("a.jpg") and paths[1] == PurePosixPath("a~2.png")


def test_many_collisions_all_distinct(tmp_path):
    used: set[str] = set()
    paths = [safe_relative_path(n, used) for n in ["../x.jpg", "x.jpg", "/x.jpg", "X.JPG", "./x.jpg"] * 3]
    assert len({str(p).casefold() for p in paths}) == 15
    for p in paths:
        (tmp_path / p).write_text(str(p))
    assert len(list(tmp_path.iterdir())) == 15  # nothing overwritten


def test_inside_follows_symlinks(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    assert inside(out, out / "a/b.txt") and inside(out, out)
    assert not inside(out, out / "../x") and not inside(out, out / "link/x") and not inside(out, Path("/etc/passwd"))
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the current folder, for root and path alike
    assert inside("out", Path("out") / "a.txt") and not inside("out", Path("out") / "x/../../evil.jpg")
    assert not inside("out", "a.txt") and inside(".", "out/a.txt")
