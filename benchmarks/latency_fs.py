"""A simulated cluster file system: a read-only FUSE pass-through mount of a local folder that adds
a set latency to every round trip, like Lustre, GPFS or NFS, where a read costs 0.5-5 ms however small.

    python benchmarks/latency_fs.py SRC MOUNT [--latency-ms 2] [--bandwidth-mbps 0] [--background]
    python benchmarks/latency_fs.py --unmount MOUNT

Setup (once, root; FUSE is the benchmark's, not the project's): bash benchmarks/setup_storage.sh

What it models. Each request the kernel sends pays --latency-ms before its answer:
  open      one round trip per open (NFS: OPEN/ACCESS; Lustre: an MDS intent lock);
  read      one round trip per read request, also the one that finds the end of the file;
  getattr   one round trip per lookup or stat: how the high-level FUSE API shows a metadata
            round trip; the kernel caches its answer for --attr-timeout seconds (as NFS does);
  readdir   one round trip per listing call.
--bandwidth-mbps caps the bytes of all reads together: one shared link, on which a read's bytes
wait for those of the reads ahead of it (`link_schedule`).
The kernel's page cache is off for file data (direct_io): every read reaches this process and pays
the latency, also when the same bytes were read before. A private mmap of a file still works
(DALI's readers.file maps files); its page faults become read requests.
Many requests are served at once: libfuse's multithreaded loop with up to --threads threads, and a
request's wait is time.sleep, which releases the GIL, as does os.pread.
Its limits: the latency is fixed (no jitter, no congestion, no server-side caching or readahead);
the cost of the mount itself (kernel round trip + Python callback) comes on top, and at 0 ms it is
the whole difference from the local disk: benchmarks/storage.py measures it.

Foreground (default) serves until SIGINT/SIGTERM or `--unmount`; --background returns once mounted.
`mounted()` is the context manager other scripts use: the mount is gone when it exits, error or not.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rotnet.cli import ArgumentParser, InputError, fail  # noqa: E402


class MountError(InputError):
    """The source, the mount point or the FUSE setup does not fit; the message names it."""


@dataclass
class LinkSettings:
    latency_ms: float = 0.0       # added to every open, read, getattr and readdir
    bandwidth_mbps: float = 0.0   # MB/s (10^6 bytes) of all reads together; 0 = no cap
    attr_timeout: float = 1.0     # seconds the kernel keeps lookups and attributes (libfuse's default)
    threads: int = 64             # requests served at once


def link_schedule(now: float, free_at: float, nbytes: int, latency_s: float,
                  rate: float) -> tuple[float, float]:
    """(when the request is answered, when the link is free again) for a request of `nbytes` made at
    `now` on a link busy until `free_at`, moving `rate` bytes/s (0: no cap). The bytes queue behind
    earlier reads' bytes; the latency is paid once per request, in parallel with other requests."""
    if rate <= 0:
        return now + latency_s, free_at
    sent = max(now, free_at) + nbytes / rate
    return sent + latency_s, sent


class LatencyPassThrough:
    """mfusepy operations: the files of `root`, read-only, each request delayed per `settings`."""

    use_ns = True   # times in integer nanoseconds (mfusepy's non-deprecated form)

    def __init__(self, root: str, settings: LinkSettings):
        self.root = os.path.realpath(root)
        self.settings = settings
        self._latency = settings.latency_ms / 1000
        self._rate = settings.bandwidth_mbps * 1e6
        self._free_at = 0.0
        self._lock = threading.Lock()

    def _wait(self, nbytes: int = 0) -> None:
        if self._rate > 0:
            with self._lock:    # the link's queue; the sleep itself happens outside the lock
                done, self._free_at = link_schedule(time.monotonic(), self._free_at, nbytes, self._latency,
                                                    self._rate)
        else:
            done = time.monotonic() + self._latency
        left = done - time.monotonic()
        if left > 0:
            time.sleep(left)    # releases the GIL: other requests are served meanwhile

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        self._wait()
        st = os.lstat(self._path(path)) if fh is None else os.fstat(fh)
        out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path, fh):
        self._wait()
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path):
        self._wait()
        return os.readlink(self._path(path))

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))   # mfusepy answers with its errno
        self._wait()
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        data = os.pread(fh, size, offset)
        self._wait(len(data))
        return data

    def release(self, path, fh):
        os.close(fh)
        return 0

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                "f_flag", "f_namemax")
        return {k: getattr(st, k) for k in keys}


def serve(src: str, mount: str, settings: LinkSettings, parent: int = 0) -> None:
    """Mount and serve in this process until unmounted (blocks). parent: a process id; when it is no
    longer this process's parent (it died, even by SIGKILL), the server unmounts and exits."""
    from mfusepy import FUSE

    if parent:
        threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()

    FUSE(LatencyPassThrough(src, settings), mount, foreground=True, ro=True, direct_io=True,
         max_threads=settings.threads, max_idle_threads=settings.threads, attr_timeout=settings.attr_timeout,
         entry_timeout=settings.attr_timeout, negative_timeout=settings.attr_timeout,
         fsname=f"latency_fs:{os.path.basename(os.path.abspath(src))}")


def check_setup(src: str, mount: str) -> None:
    """MountError naming what is missing before anything is started."""
    if not os.path.isdir(src):
        raise MountError(f"{src!r}: source folder not found")
    if not os.path.isdir(mount) or os.listdir(mount):
        raise MountError(f"{mount!r}: the mount point must be an empty folder")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        raise MountError("no /dev/fuse or fusermount3: run `bash benchmarks/setup_storage.sh` (Debian fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:   # OSError: the binding found no libfuse
        raise MountError(f"the FUSE binding does not load ({e}): run `bash benchmarks/setup_storage.sh` "
                         "and use its venv's python") from None


def unmount(mount: str) -> None:
    """Unmount `mount`; lazily when a reader still holds it, so it never stays behind."""
    if not os.path.ismount(mount):
        return
    if subprocess.run(["fusermount3", "-u", mount], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-uz", mount], capture_output=True)


@contextmanager
def mounted(src: str, mount: str, settings: LinkSettings, timeout: float = 30.0):
    """`src` mounted at `mount` by a server process of its own (its GIL is not the caller's), for the
    with-block, which gets the server's process id (for `cpu_seconds`); unmounted and the server
    stopped on exit, also on an error or SIGTERM."""
    check_setup(src, mount)
    cmd = [sys.executable, os.path.abspath(__file__), src, mount, "--latency-ms", repr(settings.latency_ms),
           "--bandwidth-mbps", repr(settings.bandwidth_mbps), "--attr-timeout", repr(settings.attr_timeout),
           "--threads", str(settings.threads), "--parent", str(os.getpid())]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    pending = []
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mount):
            if server.poll() is not None:
                raise MountError(f"mounting {mount!r} failed: {server.stderr.read().strip()[-300:]}")
            if time.monotonic() > deadline:
                raise MountError(f"{mount!r} was not mounted within {timeout:g} s")
            time.sleep(0.05)
        yield server.pid
    finally:
        if main:   # a SIGTERM now must not cut the clean-up short: it waits until the end
            signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
        unmount(mount)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.terminate()      # libfuse unmounts (lazily) on SIGTERM
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        server.stderr.close()
        if main:
            signal.signal(signal.SIGTERM, old)
        if pending:
            _exit_on_sigterm(pending[0], None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds that process `pid` (all its threads) has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # after "pid (comm)": comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime


def small_file_rate(paths: list[str], threads: int, read) -> float:
    """Files/s reading each of `paths` whole with `read(path) -> bytes` (open + read + close), from
    `threads` threads: the mount's own cost at +0 ms, beside the same files on the local disk."""
    t0 = time.perf_counter()
    if threads == 1:
        for p in paths:
            read(p)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, paths))
    return len(paths) / (time.perf_counter() - t0)


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)   # libfuse's handler: leave the loop, unmount (lazily), exit


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # runs the finally blocks, so the mount is removed


def get_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("src", nargs="?", help="local folder to serve")
    ap.add_argument("mount", nargs="?", help="empty folder to mount it on")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="added to each open, read, getattr, readdir")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0, help="MB/s of all reads together; 0: no cap")
    ap.add_argument("--attr-timeout", type=float, default=1.0, help="seconds the kernel caches lookups")
    ap.add_argument("--threads", type=int, default=64, help="requests served at once")
    ap.add_argument("--background", action="store_true", help="return once mounted; stop with --unmount")
    ap.add_argument("--unmount", metavar="MOUNT", help="unmount MOUNT (the server then exits)")
    ap.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)   # set by mounted()
    return ap


def parse_settings(args) -> LinkSettings:
    if args.latency_ms < 0 or args.bandwidth_mbps < 0 or args.attr_timeout < 0 or args.threads < 1:
        raise MountError("--latency-ms, --bandwidth-mbps and --attr-timeout must be >= 0, --threads >= 1")
    return LinkSettings(args.latency_ms, args.bandwidth_mbps, args.attr_timeout, args.threads)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        if args.unmount:
            unmount(args.unmount)
            return 0
        if not (args.src and args.mount):
            raise MountError("give SRC and MOUNT (or --unmount MOUNT)")
        settings = parse_settings(args)
        check_setup(args.src, args.mount)
    except InputError as e:
        fail(e)
    if args.background:   # a detached server of its own; this process only waits for the mount
        rest = [a for a in (argv or sys.argv[1:]) if a != "--background"]
        cmd = [sys.executable, os.path.abspath(__file__), *rest]
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(args.mount):
            if time.monotonic() > deadline:
                fail(MountError(f"{args.mount!r} was not mounted within 30 s"))
            time.sleep(0.05)
        print(f"mounted {args.src} at {args.mount} (+{settings.latency_ms:g} ms); stop: "
              f"python benchmarks/latency_fs.py --unmount {args.mount}")
        return 0
    serve(args.src, args.mount, settings, args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
