"""Atomic writes: a file or directory appears whole at its path, or not at all.

Each helper is a context manager that yields a temporary path beside the
target (in the same directory, so the final rename never crosses file
systems); the caller writes there with whatever writer it has (safetensors'
`save_file`, `torch.save`, numpy, `Path.write_text`). When the block ends,
the new data is fsynced, renamed over the target, and the parent directory
fsynced, so after a crash or power cut the path holds the old contents or the
new ones, never a mix. If the block raises (KeyboardInterrupt included), the
temporary is removed and the target is left as it was.

Parent directories are created as needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; once the block ends, it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(path, "tmp")
    # Created exclusively, so two writers never share it; the umask gives it the mode a plain open would.
    temporary.touch(exist_ok=False)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; once the block ends, it is renamed to `path`.

    Without `replace`, an existing `path` must be an empty directory (the
    rename fails otherwise; callers that want a clear message check first).
    With `replace`, an existing `path` is moved aside, the new directory put
    in its place, and the old one deleted; if that rename fails, the old one
    is put back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(path, "tmp")
    staging.mkdir()
    old = None
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))  # the directory's own entries
        if replace and path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
        os.replace(staging, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the previous directory back where it was
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # what is left of it is only clutter; the new one is in place


def _sibling(path: Path, kind: str) -> Path:
    # Hidden, and random so that concurrent writers to one target never collide.
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
