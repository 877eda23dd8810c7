"""One run per output folder: the live run holds a lock on OUTPUT_DIR/.rotnet.lock.

The lock is a POSIX record lock (fcntl.lockf), which the kernel drops when the process dies, however
it dies (SIGKILL, OOM, a preempted node): a SLURM requeue of a dead job takes the folder over at once,
with no stale file to remove. Record locks are the kind network file systems pass to their server
(NFSv3 through NLM, NFSv4 natively, Lustre mounted with `-o flock`, GPFS, BeeGFS), so two jobs on two
hosts exclude each other too; docs/training.md says what each needs. The file's text names the holder
(host, pid, start time) for the refusal message; it is never deleted (deleting a locked file lets a
third run lock a new one).

    with hold_folder(out):          # FolderBusyError if another run holds it; rank 0 only
        ...                         # the run; released on exit, or by the kernel on death
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rotnet.atomic import full_disk_named, make_folder
from rotnet.cli import InputError

LOCK = ".rotnet.lock"
_BUSY = (errno.EACCES, errno.EAGAIN)   # lockf's "held by another process"


class FolderBusyError(InputError):
    """Another live run holds the output folder (the message names it), or its lock cannot be taken."""


def holder(path: Path, wait_s: float = 2.0) -> str:
    """Who holds `path`, as its text says: 'host H, pid P, started T'. The holder writes it just after
    taking the lock, so a file read in between is empty (a new one) or names the last holder (a reused
    one): either is read again for up to `wait_s`, a last holder only where it can be told dead (this
    host, no such process)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text and not _ended_here(text) or time.monotonic() >= deadline:
            return text or "a run that is still starting (its lock file is empty)"
        time.sleep(0.01)


def _ended_here(text: str) -> bool:
    """Whether `text` names a process of this host that has ended: a last holder's name."""
    here = f"host {socket.gethostname()}, pid "
    pid = text[len(here):].split(",")[0] if text.startswith(here) else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        pass
    return False


@contextmanager
def hold_folder(folder: str | Path) -> Iterator[Path]:
    """Hold `folder`'s run lock for the block (the folder must exist); FolderBusyError naming the
    holder if another live process has it, writing nothing. Yields the lock file's path."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FolderBusyError(f"cannot open the run lock {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                raise FolderBusyError(f"{folder} is in use by another run ({holder(path)}): wait for it to "
                                      "end, or give this run another train.output_dir") from None
            raise FolderBusyError(   # ENOLCK, EOPNOTSUPP: a file system without record locks
                f"cannot lock {path}: {e.strerror or e}; this file system does not support locks "
                "(docs/training.md: mount NFS with locking, Lustre with -o flock): put "
                "train.output_dir on one that does, or set train.lock=false and make sure yourself that "
                "one run at a time uses it") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        text = f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode()
        with full_disk_named(path, len(text)):
            os.pwrite(fd, text, 0)          # over the last holder's text, then cut: never empty in between
            os.ftruncate(fd, len(text))
        yield path
    finally:
        os.close(fd)   # closing drops the lock (so does the process's death)


@contextmanager
def own_folder(folder: str | Path, named: str, lock: bool = True) -> Iterator[None]:
    """Make `folder` (`make_folder`: an error names the setting `named`) and hold its run lock for the
    block, as every writer of a run folder does; lock=False (train.lock=false, for file systems without
    locks) only makes it."""
    make_folder(folder, named)
    with hold_folder(folder) if lock else nullcontext():
        yield
