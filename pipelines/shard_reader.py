"""Tar shards (webdataset layout) on disk, and reading them: `data.format: shards`.

A shard folder (`python -m pipelines.pack_shards`): manifest.json, written last; shard-000000.tar
(KEY.<image ext>, KEY.cls; KEY = packed position); shard-000000.idx (DALI's wds2idx index).
A sample is one `os.pread` of a tar kept open. Format and sample order: docs/pipelines.md.
"""
from __future__ import annotations

import gc
import json
import os
import threading

import numpy as np

from pipelines.listing import BadImageError

MANIFEST = "manifest.json"
FORMAT = "rotnet-shards"
FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"              # DALI's wds2idx index format
LABEL_EXT = "cls"
# Member extension per source extension; decoders read the content, so a PNG named .JPEG still decodes.
IMAGE_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".ppm": "ppm", ".bmp": "bmp", ".pgm": "pgm",
             ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"}


def shard_files(i: int) -> tuple[str, str]:
    """(tar, index) file names of shard i."""
    return f"shard-{i:06d}.tar", f"shard-{i:06d}.idx"


def member_key(position: int) -> str:
    """Sample key: its position in packed order (digits only: no dot, so the extension is clear)."""
    return f"{position:09d}"


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """Index of a tar: per sample its members as (ext, data offset, size, member name)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in s) for s in samples]
    return "\n".join(lines) + "\n"


def read_index(path: str) -> list[dict[str, tuple[int, int, str]]]:
    """Per sample {ext: (data offset, size, member name)}; ValueError naming the file if malformed."""
    with open(path, encoding="utf-8") as f:
        head, *rows = f.read().splitlines()
    version, _, count = head.partition(" ")
    if version != INDEX_VERSION or not count.isdigit() or int(count) != len(rows):
        raise ValueError(f"{path}: not a {INDEX_VERSION} index of {len(rows)} samples (header {head!r})")
    # Many small containers trigger full collections over torch's and DALI's objects: pause the GC.
    paused = gc.isenabled()
    gc.disable()
    try:
        samples = []
        for n, row in enumerate(rows, 2):
            parts = row.split(" ")
            if len(parts) % 4:
                raise ValueError(f"{path}:{n}: expected 'ext offset size name' per member, got {row!r}")
            samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                            for i in range(0, len(parts), 4)})
        return samples
    finally:
        if paused:
            gc.enable()


class ShardSet:
    """Sample i = `size[i]` bytes at `offset[i]` of tar `tar_of[i]`; picklable; keeps tars open."""

    def __init__(self, tars, tar_of, offset, size):
        self.tars = tuple(tars)
        self.tar_of, self.offset, self.size = (np.asarray(a, dtype=np.int64) for a in (tar_of, offset, size))
        self._fds, self._pid, self._lock = {}, None, threading.Lock()

    def __getstate__(self):
        return {"tars": self.tars, "tar_of": self.tar_of, "offset": self.offset, "size": self.size}

    def __setstate__(self, state):
        self.__init__(**state)

    def subset(self, keep: list[int]) -> "ShardSet":
        return ShardSet(self.tars, self.tar_of[keep], self.offset[keep], self.size[keep])

    def read(self, i: int) -> bytes:
        t, off, size = int(self.tar_of[i]), int(self.offset[i]), int(self.size[i])
        data = os.pread(self._fd(t), size, off)
        if len(data) != size:
            raise BadImageError(f"{self.tars[t]} ends at byte {off + len(data)}, before the member at "
                                f"{off}+{size} (truncated shard: repack it)")
        return data

    def _fd(self, t: int) -> int:
        with self._lock:
            if self._pid != os.getpid():       # a forked worker: the parent's descriptors are not ours
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(t)
            if fd is None:
                if len(self._fds) >= _fd_budget():
                    os.close(self._fds.pop(next(iter(self._fds))))   # the longest open
                fd = self._fds[t] = os.open(self.tars[t], os.O_RDONLY)
            return fd


def _fd_budget() -> int:
    """Tars one process keeps open: half its descriptor limit (the longest open is closed beyond)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return 256
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(soft, 1 << 20) // 2)


def read_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        why = "the packer did not finish: rerun it" if os.path.isdir(shard_dir) else "folder not found"
        raise BadImageError(f"no {MANIFEST} in {shard_dir!r} ({why}); data.format=shards reads folders "
                            "written by `python -m pipelines.pack_shards SPLIT_DIR --out DIR`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:   # unreadable, or not JSON (a copy cut short)
        raise BadImageError(f"cannot read {path!r} ({e}); repack: python -m pipelines.pack_shards") from None
    kind = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
    if kind != (FORMAT, FORMAT_VERSION):
        raise BadImageError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest; "
                            "repack with `python -m pipelines.pack_shards`")
    return manifest


def list_shards(shard_dir: str) -> tuple[list[str], list[int], list[str], ShardSet]:
    """(member names "DIR/shard-000000.tar:000000017.jpg", labels, class names, ShardSet), packed
    order; a tar or index that disagrees with the manifest is an error naming the file."""
    shard_dir = os.path.abspath(shard_dir)
    manifest = read_manifest(shard_dir)
    names, labels, tars, tar_of, offset, size = [], [], [], [], [], []
    for t, entry in enumerate(manifest["shards"]):
        tar, idx = (os.path.join(shard_dir, entry[k]) for k in ("tar", "index"))
        if not os.path.isfile(tar) or os.path.getsize(tar) != entry["bytes"]:
            raise BadImageError(f"shard {tar!r} is missing or not {entry['bytes']} bytes as {MANIFEST} says; "
                                "rerun the packer on the same source and --out (it rewrites only bad shards)")
        samples = read_index(idx)
        if len(samples) != entry["count"] or len(entry["labels"]) != entry["count"]:
            raise BadImageError(f"{idx!r} lists {len(samples)} samples, {MANIFEST} {entry['count']}: repack")
        tars.append(tar)
        for s in samples:
            image = [ext for ext in s if ext != LABEL_EXT]
            if len(image) != 1:
                raise BadImageError(f"{idx!r}: a sample of {sorted(s)}, expected one image and .{LABEL_EXT}")
            off, n, member = s[image[0]]
            names.append(f"{tar}:{member}")
            tar_of.append(t)
            offset.append(off)
            size.append(n)
        labels.extend(entry["labels"])
    count = manifest["count"]
    if len(names) != count:
        raise BadImageError(f"{shard_dir!r}: shards hold {len(names)} samples, {MANIFEST} says {count}")
    return names, labels, list(manifest["classes"]), ShardSet(tars, tar_of, offset, size)

