"""Atomic writes: the target holds the old contents or the new ones, never a part, and no temporary stays."""

import os

import pytest

from rgemma import _io
from rgemma._io import atomic_directory, atomic_file


class Midway(Exception):
    pass


def test_file_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # the parent is made as needed
    with atomic_file(target) as temporary:
        temporary.write_text("first")
        assert not target.exists()  # nothing at the path until the block ends
    with atomic_file(target) as temporary:
        temporary.write_text("second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.txt"]


@pytest.mark.parametrize("error", [Midway, KeyboardInterrupt])
def test_file_writer_raising_midway_leaves_nothing(tmp_path, error):
    target = tmp_path / "out.bin"
    with pytest.raises(error):
        with atomic_file(target) as temporary:
            with open(temporary, "wb") as file:
                file.write(b"half")
                raise error
    assert os.listdir(tmp_path) == []


def test_file_failure_leaves_the_existing_target_untouched(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Midway):
        with atomic_file(target) as temporary:
            temporary.write_text("new, but never finished")
            raise Midway
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_file_data_and_its_directory_entry_are_synced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(_io, "_fsync", lambda path: synced.append((path, path.read_bytes() if path.is_file() else None)))
    with atomic_file(tmp_path / "out.txt") as temporary:
        temporary.write_text("data")
    assert synced == [(temporary, b"data"), (tmp_path, None)]  # the data before the rename, the rename after


def test_directory_appears_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("a")
        (staging / "nested").mkdir()
        (staging / "nested" / "b").write_text("b")
        assert not target.exists()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["a", "nested", "nested/b"]
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("error", [Midway, KeyboardInterrupt])
def test_directory_writer_raising_midway_leaves_the_old_state(tmp_path, error, replace):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(error):
        with atomic_directory(tmp_path / "fresh", replace=replace) as staging:
            (staging / "a").write_text("a")
            raise error
    with pytest.raises(error):
        with atomic_directory(target, replace=replace) as staging:
            (staging / "new").write_text("new")
            raise error
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["old"]


def test_directory_replace_swaps_an_old_directory(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as staging:
        (staging / "old").write_text("old")
    with atomic_directory(target, replace=True) as staging:
        (staging / "new").write_text("new")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["final"]


def test_directory_without_replace_refuses_a_full_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep").write_text("keep")
    with pytest.raises(OSError):
        with atomic_directory(target) as staging:
            (staging / "new").write_text("new")
    assert os.listdir(target) == ["keep"] and os.listdir(tmp_path) == ["model"]


def test_directory_failed_swap_puts_the_old_one_back(tmp_path, monkeypatch):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".final.tmp-")):
            raise KeyboardInterrupt  # between moving the old one aside and renaming the new one in
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, replace=True) as staging:
            (staging / "new").write_text("new")
    assert os.listdir(target) == ["old"] and os.listdir(tmp_path) == ["final"]
