"""Atomic file writes, the one rule for every file rotnet writes over an earlier one: written under
a hidden `.tmp-` name beside the target, fsynced, renamed over it. A crash mid-write leaves the
earlier file whole, and no reader takes the hidden temp for data."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

TMP = ".tmp-"   # prefix of a file being written


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)   # a folder too: makes the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield the temporary path to write `path` through: renamed over `path` on a clean exit,
    removed on an exception."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, TMP + name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, os.path.join(folder, name))
        _fsync(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` (UTF-8) afterwards, or its earlier content if anything failed."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
