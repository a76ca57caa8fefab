"""Atomic writes: complete or nothing, with the permissions any other file of the user's would get."""
import os
import stat

import pytest

from danlu.utils.atomic import atomic_directory, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_directories_take_the_umasks_permissions_not_0600(tmp_path, umask_022):
    atomic_write_text(tmp_path / "config.json", "{}")
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_text("x")
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model"]  # no temporary left


def test_a_failed_directory_leaves_the_old_one_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "model" / "old", "kept")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "model") as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("crash mid-save")
    assert (tmp_path / "model" / "old").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
