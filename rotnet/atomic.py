"""Atomic file writes, the one rule for every file rotnet writes over an earlier one: written under
a hidden `.tmp-` name beside the target, fsynced, renamed over it. A crash mid-write leaves the
earlier file whole, and no reader takes the hidden temp for data. The temporary name carries the
host and pid, so two processes writing one target (a mistake the run lock refuses, rotnet.runlock)
never write into each other's temp file.

A full file system (ENOSPC, or a quota: EDQUOT) ends the write in a DiskFullError naming the file,
the bytes it needed and the bytes free; the temporary file is removed, the earlier file kept."""
from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from rotnet.cli import InputError

TMP = ".tmp-"   # prefix of a file being written
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(InputError):
    """A write found its file system full; the message names the file, bytes needed and free."""


def make_folder(path: str | os.PathLike, named: str) -> None:
    """mkdir -p `path`; an OSError (a file in the way, no permission, a read-only disk) is an InputError
    naming `named`, the setting the path came from."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"{named}={str(path)!r}: cannot make this folder ({e.strerror or e})") from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)   # a folder too: makes the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: str | os.PathLike) -> str:
    """The temporary name `path` is written under by this process: FOLDER/.tmp-NAME.HOST.PID."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TMP}{name}.{socket.gethostname()}.{os.getpid()}")


def disk_full(path: str, needed: int, written: int) -> DiskFullError:
    """The error for a write of `path` that filled its disk after `written` bytes; `needed` (0 when
    the writer cannot know it in advance) is the file's full size."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"{needed} bytes" if needed else f"more than the {written} bytes written"
    return DiskFullError(f"disk full writing {path}: it needs {need}, {free} there; "
                         "nothing was replaced: free some space (or write elsewhere) and run it again")


@contextmanager
def full_disk_named(path: str | os.PathLike, size: int, partial: str = "") -> Iterator[None]:
    """A full disk inside the block, which writes `size` bytes to `path` (through `partial`, a
    temporary file, if given), is a DiskFullError."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        written = os.path.getsize(partial) if partial and os.path.exists(partial) else 0
        raise disk_full(str(path), size, written) from None


@contextmanager
def atomic_path(path: str | os.PathLike, size: int = 0) -> Iterator[str]:
    """Yield the temporary path to write `path` through: renamed over `path` on a clean exit,
    removed on an exception. `size`: the bytes the file will take, when known (for DiskFullError)."""
    tmp = tmp_path(path)
    try:
        with full_disk_named(path, size, partial=tmp):
            yield tmp
            _fsync(tmp)
            os.replace(tmp, os.path.abspath(path))
            _fsync(os.path.dirname(tmp))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """`path` holds `data` afterwards, or its earlier content if anything failed."""
    with atomic_path(path, size=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` (a log, not atomic); a full disk is a DiskFullError naming it."""
    with full_disk_named(path, len(text.encode("utf-8"))), open(path, "a", encoding="utf-8") as f:
        f.write(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` (UTF-8) afterwards, or its earlier content if anything failed."""
    write_bytes(path, text.encode("utf-8"))
