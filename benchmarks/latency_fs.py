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
wait for those of the reads ahead of it.
The kernel's page cache is off for file data (direct_io): every read reaches this process and pays
the latency, also when the same bytes were read before. A private mmap of a file still works
(DALI's readers.file maps files); its page faults become read requests.
Many requests are served at once: libfuse's multithreaded loop with up to --threads threads, each
request sleeping its latency in a thread of its own. The server is C (latency_fs_server.c, built by
the setup script): it shares the cores with the readers it measures, where a cluster's file server
has cores of its own, so its CPU per request must stay small (a Python server cost six times as
much per file: docs/pipelines.md, "Cluster storage").
Its limits: the latency is fixed (no jitter, no congestion, no server-side caching or readahead);
the cost of the mount itself (kernel round trip + server) comes on top, and at 0 ms it is the whole
difference from the local disk: benchmarks/storage.py measures it.

Foreground (default) serves until SIGINT/SIGTERM or `--unmount`; --background returns once mounted.
`mounted()` is the context manager other scripts use: the mount is gone when it exits, error or not.
"""
from __future__ import annotations

import argparse
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


SERVER = "latency-fs-server"   # benchmarks/latency_fs_server.c, built beside the venv's python


def server_binary() -> str:
    """The C server that `bash benchmarks/setup_storage.sh` built into this venv's bin/."""
    path = os.path.join(os.path.dirname(sys.executable), SERVER)
    if not os.access(path, os.X_OK):
        raise MountError(f"no {path}: run `bash benchmarks/setup_storage.sh` (it builds the mount's server) "
                         "and use its venv's python")
    return path


def server_command(src: str, mount: str, settings: LinkSettings, parent: int = 0) -> list[str]:
    """The server's command line (latency_fs_server.c's usage). parent: a process id; when it is gone
    (even by SIGKILL), the server unmounts and exits."""
    return [server_binary(), src, mount, repr(settings.latency_ms), repr(settings.bandwidth_mbps),
            repr(settings.attr_timeout), str(settings.threads), str(parent)]


def check_setup(src: str, mount: str) -> None:
    """MountError naming what is missing before anything is started."""
    if not os.path.isdir(src):
        raise MountError(f"{src!r}: source folder not found")
    if not os.path.isdir(mount) or os.listdir(mount):
        raise MountError(f"{mount!r}: the mount point must be an empty folder")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        raise MountError("no /dev/fuse or fusermount3: run `bash benchmarks/setup_storage.sh` (Debian fuse3)")
    server_binary()


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
    server = subprocess.Popen(server_command(src, mount, settings, os.getpid()), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
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
    cmd = server_command(args.src, args.mount, settings)
    if not args.background:
        os.execv(cmd[0], cmd)   # serves in the foreground until SIGINT/SIGTERM or --unmount
    # --background: a detached server of its own; this process only waits for the mount
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not os.path.ismount(args.mount):
        if time.monotonic() > deadline:
            fail(MountError(f"{args.mount!r} was not mounted within 30 s"))
        time.sleep(0.05)
    print(f"mounted {args.src} at {args.mount} (+{settings.latency_ms:g} ms); stop: "
          f"python benchmarks/latency_fs.py --unmount {args.mount}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
