"""Atomic files: whole or absent, and readable as the user's umask allows (not 0600)."""
import os

import pytest
import torch

from rdprune.files import atomic_torch_save, atomic_write, atomic_write_text, write_json


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_written_files_get_the_mode_of_a_normal_file(tmp_path, umask):
    (tmp_path / "normal").write_text("x")
    expected = (tmp_path / "normal").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    atomic_write_text(tmp_path / "a.txt", "text")
    write_json(tmp_path / "b.json", {"k": 1})
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "sub" / "c.pt")
    for name in ("a.txt", "b.json", "sub/c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "r.txt", "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "r.txt", broken)
    assert (tmp_path / "r.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]
