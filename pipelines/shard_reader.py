"""Tar shards (webdataset layout) on disk, and reading them: `data.format: shards`.

A shard folder, written by `python -m pipelines.pack_shards` (the packer):

  manifest.json          what the set is: count, classes (sorted train order), per shard its
                         tar, index, sample count, byte size and labels; source and packing
                         settings. Written last: a folder without it is not finished.
  shard-000000.tar       samples KEY.<image ext> (the source file's bytes, unchanged) and
                         KEY.cls (class index as text), KEY = 9-digit position in packed order
  shard-000000.idx       DALI's index (the `wds2idx` format, v1.2): "v1.2 N", then per sample
                         "ext offset size name" per member

Reading never scans a tar: the manifest gives labels, the index gives each member's offset
and size, and a sample is one `os.pread` from a tar kept open (one open per shard and process,
instead of one per image per epoch: the metadata load that hurts shared filesystems).

Which sample is read when is NOT the tar's order: the loaders pick samples exactly as for
folders (`pipelines.contract.rank_indices`, DALI through `ShardFeed`); see docs/pipelines.md.
"""
from __future__ import annotations

import gc
import json
import os
import threading
from collections import deque

import numpy as np

from pipelines.contract import rank_indices
from pipelines.listing import BadImageError

MANIFEST = "manifest.json"
FORMAT = "rotnet-shards"
FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"              # DALI's wds2idx index format
LABEL_EXT = "cls"
# Member extension of a source image: lower case, one spelling per format. The bytes are never
# re-encoded; decoders read the content, so a PNG named .JPEG stays a "jpg" member and decodes.
IMAGE_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".ppm": "ppm", ".bmp": "bmp", ".pgm": "pgm",
             ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"}


def shard_files(i: int) -> tuple[str, str]:
    """(tar, index) file names of shard i."""
    return f"shard-{i:06d}.tar", f"shard-{i:06d}.idx"


def member_key(position: int) -> str:
    """Sample key: its position in packed order (digits only: no dot, so the extension is clear)."""
    return f"{position:09d}"


# ------------------------------------------------------------------ index files (wds2idx format)

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
    # The records are a few small containers per sample, and piling them up triggers full collections;
    # with torch and DALI imported one walks ~300k objects (0.3 s of a 0.37 s `list_shards` of 9,469
    # samples, measured) and finds no garbage here. So the collector pauses for the parse.
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


# ------------------------------------------------------------------ the set, read by the loaders

class ShardSet:
    """The image bytes of a shard folder: sample i = `size[i]` bytes at `offset[i]` of tar `tar_of[i]`.

    Picklable (DataLoader workers); each process opens the tars it reads once and keeps them
    open, up to half its file-descriptor limit (then the longest open is closed first).
    """

    def __init__(self, tars, tar_of, offset, size):
        self.tars = tuple(tars)
        self.tar_of, self.offset, self.size = (np.asarray(a, dtype=np.int64) for a in (tar_of, offset, size))
        self._fds, self._pid, self._lock = {}, None, threading.Lock()

    def __len__(self) -> int:
        return len(self.offset)

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
    """Tars one process keeps open: half its descriptor limit (512 of the usual 1,024; ImageNet in
    the packer's default 5,000-image shards is 257 tars), the rest left to the program."""
    try:
        import resource   # POSIX only
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
    """(member names, labels, class names, ShardSet) of a shard folder, in packed order.

    Names read "DIR/shard-000000.tar:000000017.jpg": what errors name. A tar whose size differs
    from the manifest's, or an index that disagrees with it, is an error naming the file.
    """
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
                raise BadImageError(f"{idx!r}: sample with members {sorted(s)}, expected one image and .{LABEL_EXT}")
            off, n, member = s[image[0]]
            names.append(f"{tar}:{member}")
            tar_of.append(t)
            offset.append(off)
            size.append(n)
        labels.extend(entry["labels"])
    if len(names) != manifest["count"]:
        raise BadImageError(f"{shard_dir!r}: shards hold {len(names)} samples, {MANIFEST} says {manifest['count']}")
    return names, labels, list(manifest["classes"]), ShardSet(tars, tar_of, offset, size)


class ShardFeed:
    """DALI `external_source` callback of a shard loader: pipeline iteration i -> the bytes and labels
    of step i % steps of reader epoch i // steps, as `rank_indices` orders them.

    `__call__(i)` -> (list of uint8 (size,) arrays, int32 (B, 1) labels). A function of i alone, so
    a pipeline restored from DALI's checkpoint (which records i) continues exactly. `recent`
    keeps the sample indices of the batches in flight, to name a file DALI could not decode.
    """

    def __init__(self, spec, steps: int, depth: int):
        self.spec, self.steps = spec, steps
        self.labels = np.asarray(spec.labels, dtype=np.int32)
        self.recent = deque(maxlen=depth + 2)
        self._epoch, self._order = None, None

    def __call__(self, i: int):
        epoch, step = divmod(i, self.steps)
        if epoch != self._epoch:
            s = self.spec
            self._order = rank_indices(len(s.paths), s.pipe_batch, s.rank, s.world_size, s.train, s.seed, epoch)
            self._epoch = epoch
        p = self.spec.pipe_batch
        idx = self._order[step * p:(step + 1) * p]
        self.recent.append(idx)
        data = [np.frombuffer(self.spec.shards.read(j), dtype=np.uint8) for j in idx]
        return data, self.labels[idx].reshape(-1, 1)

    def in_flight(self) -> list[int]:
        return [j for idx in self.recent for j in idx]
