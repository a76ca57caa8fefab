"""Writes that either complete or leave nothing behind: temp file or directory, then rename.

What is renamed into place is on the disk first: its files and directories are fsynced before the rename, and
the directory holding it after, so that a power cut leaves the old version or the new one, never a name
pointing at a file whose data was still in the page cache.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Optional

# The names the writes below leave beside their target until the rename (and a crash leaves for good):
# temporary_sibling's `.NAME.<12 hex>.tmp`, atomic_files' `.staged.<8 chars>.tmp` (tempfile's names) and
# atomic_directory's `.NAME.old` (the replaced version, between its two renames).
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
STAGED_NAME = re.compile(r"^\.staged\.[a-z0-9_]{8}\.tmp$")
OLD_SUFFIX = ".old"


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`. Created with the umask's permissions, unlike mkstemp/mkdtemp's 0600/0700,
    which would hide a saved model from the user's group."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one of the temporary names this module writes (never a user's file)."""
    return bool(TEMPORARY_NAME.match(name) or STAGED_NAME.match(name))


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to the disk. Where directories cannot
    be opened (Windows) that part is skipped."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some platforms) do not fsync; nothing more to do
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` (walked once), then each directory, deepest first, `root` last."""
    directories = []
    for current, _, files in os.walk(root):
        directories.append(current)
        for name in files:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                fsync_path(Path(path))
    for directory in reversed(directories):
        fsync_path(Path(directory))


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
    fsync_path(path.parent)


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
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_path(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
            fsync_path(target.parent)
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
        fsync_tree(tmp)
        for item in sorted(tmp.iterdir()):
            destination = target / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
        fsync_path(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: Path, keep_old_of=None) -> list[Path]:
    """Remove, from `directory` itself (not below it), the temporaries that a write cut short by a crash left:
    the names above and nothing else. A `.NAME.old` whose NAME is gone is the complete earlier version of NAME
    (the crash came between atomic_directory's two renames): it is renamed back when `keep_old_of(NAME)` says NAME
    is worth keeping, else removed. Returns what was removed or renamed back."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    handled = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if is_temporary_name(name):
            handled.append(path)
            _remove(path)
        elif name.startswith(".") and name.endswith(OLD_SUFFIX) and len(name) > len(OLD_SUFFIX) + 1:
            original = directory / name[1:-len(OLD_SUFFIX)]
            if is_temporary_name(original.name):
                handled.append(path)
                _remove(path)
            elif keep_old_of is not None and keep_old_of(original.name):
                handled.append(path)
                if original.exists():
                    _remove(path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, original)
    return handled


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------- outputs checked before the work


class OutputNotWritable(ValueError):
    """An output path that a command could not write: checked before any model is loaded."""


def check_output_directory(path, name: str, force: Optional[bool] = None) -> Path:
    """Refuse (OutputNotWritable, naming `name` and the path) a directory output that cannot be written: a file
    is there, or the nearest existing directory on the way to it does not take new files. Creates nothing.
    force False: an existing output is refused too (ValueError: pass --force to replace it)."""
    path = Path(path)
    _check_replace(path, force)
    if path.exists() and not path.is_dir():
        raise OutputNotWritable(f"{name} {path} is a file, not a directory; choose another {name}")
    _check_can_create_in(path.absolute() if path.is_dir() else _nearest_existing_parent(path, name), path, name)
    return path


def check_output_file(path, name: str, force: Optional[bool] = None) -> Path:
    """Refuse (OutputNotWritable) a file output that cannot be written: a directory is there, the file is not
    writable, or its directory cannot be created or written to. Creates nothing and leaves a file as it was.
    force False: an existing output is refused too, as by check_output_directory."""
    path = Path(path)
    _check_replace(path, force)
    if path.is_dir():
        raise OutputNotWritable(f"{name} {path} is a directory; name a file")
    if path.is_file():
        try:
            with open(path, "ab"):  # opening to append changes neither the contents nor the times
                pass
        except OSError as e:
            raise OutputNotWritable(f"{name} {path} cannot be written: {e.strerror or e}") from None
        return path
    if path.exists():  # a device or a pipe (/dev/stdout): opening one could block
        if not os.access(path, os.W_OK):
            raise OutputNotWritable(f"{name} {path} cannot be written: permission denied")
        return path
    _check_can_create_in(_nearest_existing_parent(path.parent, name, path), path, name)
    return path


def _check_replace(path: Path, force: Optional[bool]) -> None:
    if force is False and path.exists():
        raise ValueError(f"{path}: already exists; pass --force to replace it")


def _nearest_existing_parent(path: Path, name: str, output: Optional[Path] = None) -> Path:
    output = output or path
    current = path.absolute()
    while not current.exists():
        if current.is_symlink():  # a dangling link: its target's directory is what would be written
            raise OutputNotWritable(f"{name} {output}: {current} is a link to nothing")
        current = current.parent
    if not current.is_dir():
        raise OutputNotWritable(f"{name} {output} cannot be created: {current} is a file, not a directory")
    return current


def _check_can_create_in(directory: Path, output: Path, name: str) -> None:
    """Create (and at once drop) a nameless file in `directory`: the one sure test, as root too (a read-only
    file system, a full quota); os.access alone misses both."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        where = "" if directory == output.absolute() else f" ({directory} does not take new files)"
        raise OutputNotWritable(f"{name} {output} cannot be written: {reason}{where}") from None
