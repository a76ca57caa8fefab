"""Writes that either complete or leave nothing behind: temp file or directory, then rename."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`. Created with the umask's permissions, unlike mkstemp/mkdtemp's 0600/0700,
    which would hide a saved model from the user's group."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path):
    """Yield a temporary directory beside `target`; on success it replaces `target`, on failure it is removed.

    An existing `target` is only removed once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(target: Path):
    """Yield a temporary directory whose files, once it is complete, are moved into the directory `target`
    one rename each, beside what `target` already holds (a run's final model next to its checkpoints)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".staged.", suffix=".tmp"))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            destination = target / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
