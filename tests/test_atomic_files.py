"""Atomic writes: a destination is either untouched or whole, and overlapping writers of one path all succeed."""

import pytest

from hybridlm.atomic_files import atomic_directory, atomic_path, atomic_write_text


def test_overlapping_writers_of_one_path_all_succeed(tmp_path):
    target = tmp_path / "out" / "file.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == target.parent
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # renamed last
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_an_error_leaves_the_destination_as_it_was(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_text("kept")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(tmp_path / "dir") as tmp:
        (tmp / "b").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.txt"]
    with atomic_directory(tmp_path / "dir") as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.txt"]
