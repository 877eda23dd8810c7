"""Which files a loader reads (image folders, file lists, tar shards) and how it holds the list of them.

ImageNet layout: SPLIT/CLASS/IMAGE. Class index = position of CLASS in sorted folder order
(what torchvision's ImageFolder does), so indices agree between the train and val splits.
A flat split (SPLIT/IMAGE, as ImageNet's val extracts) has no labels: rotation loaders read it,
class loaders refuse it naming `python -m pipelines.imagenet_val`, which gives it class folders.

File lists (written by `python -m pipelines.scan`, read here) have one `relative/path label`
line per image, the path relative to the split folder; the label is the last whitespace
separated token, so paths may contain spaces. `data.file_list` may contain `{split}`, which
is replaced by the split folder's name, so one config value serves train and val.

Tar shards (webdataset layout, written by `python -m pipelines.pack_shards`): manifest.json, written
last; shard-000000.tar (KEY.<image ext>, KEY.cls; KEY = packed position); shard-000000.idx (DALI's
wds2idx index). A sample is one `os.pread` of a tar kept open. Format, order: docs/pipelines.md.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import threading
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from rotnet.atomic import write_text
from rotnet.cli import InputError

# Same set as torchvision.datasets.folder.IMG_EXTENSIONS; compared case-insensitively,
# so ImageNet's upper-case ".JPEG" is found.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(InputError):
    """An image file cannot be decoded (or a split cannot be listed); the message names it."""


class SplitLayoutError(BadImageError):
    """A split folder's layout does not fit its use (empty; loose images beside sub-folders; flat
    where class labels are needed)."""


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


# ---------------------------------------------------------------------------- split layouts

# What a folder holds, by its direct entries (hidden ones ignored). The one place that decides
# whether a split is flat: every loader, the scan and the converter ask `split_layout`.
CLASSES = "classes"   # sub-folders only: SPLIT/CLASS/IMAGE
FLAT = "flat"         # images only: SPLIT/IMAGE, e.g. ImageNet's val as extracted (no labels)
MIXED = "mixed"       # loose images beside sub-folders
EMPTY = "empty"       # neither

CONVERT_HINT = ("for ImageNet's official val, give it class folders with `python -m pipelines.imagenet_val "
                "VAL_DIR --labels LABELS --train-dir TRAIN_DIR --out OUT` and set data.val_dir=OUT")


def split_layout(folder: str) -> str:
    """CLASSES, FLAT, MIXED or EMPTY (see above); SplitLayoutError if `folder` is not a folder."""
    if not os.path.isdir(folder):
        raise SplitLayoutError(f"image folder not found: {folder!r}")
    dirs = images = False
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs = True
            elif is_image_file(e.name) and e.is_file():
                images = True
            if dirs and images:
                return MIXED
    return CLASSES if dirs else FLAT if images else EMPTY


def layout_error(folder: str, layout: str) -> SplitLayoutError:
    """The error for a split of `layout` where SPLIT/CLASS/IMAGE is needed, naming the fix."""
    if layout == FLAT:
        return SplitLayoutError(f"{folder!r} holds images without class folders, so it has no class labels; "
                                + CONVERT_HINT)
    if layout == MIXED:
        return SplitLayoutError(f"{folder!r} holds both loose images and sub-folders: put every image in a "
                                "class folder (SPLIT/CLASS/IMAGE), or move the sub-folders out for a flat "
                                "split of unlabelled images (SPLIT/IMAGE)")
    return SplitLayoutError(f"{folder!r} has no class folders and no images (expected SPLIT/CLASS/IMAGE)")


def class_folders(root_split: str) -> list[str]:
    """Sorted class folder names of a split; a clear error if it is missing, empty, flat or mixed."""
    layout = split_layout(root_split)
    if layout != CLASSES:
        raise layout_error(root_split, layout)
    return sorted(e.name for e in os.scandir(root_split) if e.is_dir() and not e.name.startswith("."))


def read_file_list(path: str) -> tuple[list[str], list[int]]:
    """Parse `relative/path label` lines (blank lines and '#' comments skipped)."""
    rel, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise BadImageError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
                rel.append(parts[0])
                labels.append(int(parts[1]))
    except (OSError, UnicodeDecodeError) as e:   # missing, a folder, not text
        why = getattr(e, "strerror", None) or e
        raise BadImageError(f"cannot read the file list {path!r}: {why}") from None
    return rel, labels


def file_list_lines(rel_paths: Iterable[str], labels: Iterable[int]) -> Iterator[str]:
    """`relative/path label` lines, the format of file lists (ours and DALI's readers.file); a
    BadImageError at a name with a newline, which the format cannot hold."""
    for p, lab in zip(rel_paths, labels):
        if "\n" in p:
            raise BadImageError(f"newline in file name cannot go in a file list: {p!r}; rename the file")
        yield f"{p} {lab}\n"


def write_file_list(path: str, rel_paths: list[str], labels: list[int]) -> None:
    """Write the format `read_file_list` (and DALI's readers.file file_list) reads, atomically
    (rotnet.atomic): an error leaves an earlier list whole. InputError naming `path` when it cannot
    be written (a read-only folder, a file in the way)."""
    text = "".join(file_list_lines(rel_paths, labels))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text(path, text)
    except OSError as e:
        raise InputError(f"cannot write the file list {path!r}: {e.strerror or e}") from None


def list_images(root_split: str, file_list: str = "", *, labelled: bool = True,
                class_dir: str = "") -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class_names) of a split, paths absolute, in sorted (class, name) order.

    Non-image files (by extension) and hidden files are skipped. An empty class folder is
    skipped with a warning naming it but keeps its class index, so labels still agree with
    the other split. labelled=False (rotation loaders, the scan: class labels unused) also
    lists a flat split (SPLIT/IMAGE): its images in name order, every label 0, no class names;
    labelled=True refuses it with the conversion to run.

    With `file_list`, the images are that list's lines (paths relative to `root_split`); class
    names come from the split's folders when it has them, else (a flat split, whose list's
    labels index the train split's classes) from `class_dir`'s, else '0', '1', ...

    Symlinked class folders, sub-folders and files are followed, but a folder reached twice by its
    real path (a link to `..`, two links to one folder) is listed once, with one warning naming it.
    A 0-byte file (a copy cut short) is a BadImageError naming it, before a decoder sees it.
    """
    paths, labels, classes = find_images(root_split, file_list, labelled=labelled, class_dir=class_dir)
    refuse_empty(paths)
    return paths, labels, classes


def refuse_empty(paths: Iterable[str]) -> None:
    """BadImageError naming the first 0-byte file of `paths` (one stat each; a missing file is the
    loader's to name)."""
    for p in paths:
        try:
            if os.stat(p).st_size == 0:
                raise BadImageError(f"empty (0-byte) image file: {p}; remove it, or write a file list "
                                    "without it: python -m pipelines.scan SPLIT_DIR")
        except FileNotFoundError:
            continue


def images_under(folder: str, seen: set[str], loops: list[str]) -> list[str]:
    """Image files under `folder` (links followed) in sorted order; a folder whose real path is in
    `seen` is skipped and named in `loops`; the others go in `seen`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            loops.append(f"{dirpath} -> {real}")
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files


def find_images(root_split: str, file_list: str = "", *, labelled: bool = True,
                class_dir: str = "") -> tuple[list[str], list[int], list[str]]:
    """list_images without its check of the files' sizes (the scan reports those itself)."""
    root_split = os.path.abspath(root_split)
    if file_list:
        rel, labels = read_file_list(file_list)
        if not rel:
            raise BadImageError(f"file list {file_list!r} has no entries")
        named = root_split if os.path.isdir(root_split) else ""
        if named and split_layout(named) == FLAT:
            named = class_dir if class_dir and os.path.isdir(class_dir) else ""
        classes = class_folders(named) if named else [str(i) for i in range(max(labels) + 1)]
        return [os.path.join(root_split, p) for p in rel], labels, classes
    if not labelled and split_layout(root_split) == FLAT:
        with os.scandir(root_split) as it:
            paths = sorted(e.path for e in it if is_image_file(e.name) and e.is_file())
        return paths, [0] * len(paths), []
    classes = class_folders(root_split)
    paths, labels, empty, loops = [], [], [], []
    seen = {os.path.realpath(root_split)}   # and its parents: a link up the tree is a loop too
    while (up := os.path.dirname(min(seen, key=len))) not in seen:
        seen.add(up)
    for idx, name in enumerate(classes):
        folder = os.path.join(root_split, name)
        files = images_under(folder, seen, loops)
        if not files:
            empty.append(folder)
        paths.extend(files)
        labels.extend([idx] * len(files))
    if loops:
        warnings.warn(f"symlink loop or repeated folder: {len(loops)} folder(s) reached a second time by "
                      f"real path, listed once: {loops[0]}" + (" ..." if len(loops) > 1 else ""))
    if empty:
        warnings.warn(f"skipping {len(empty)} class folder(s) without images (class index kept): "
                      + ", ".join(repr(e) for e in empty[:5]) + (" ..." if len(empty) > 5 else ""))
    if not paths:
        raise BadImageError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root_split!r}")
    return paths, labels, classes


class PathTable:
    """A split's file paths as a loader holds them (`LoaderSpec.paths`): a sequence of str, held as one UTF-8
    buffer after their common folder plus an int64 array of ends.

    At ImageNet's 1.28M files a tuple of str costs ~110 bytes a path on every rank; this costs the
    bytes after the folder plus 8. It is also never written once built: reading a str out of a
    tuple writes its reference count, so every forked DataLoader worker ends up copying each page
    of them, while the buffer and the array stay shared.
    """

    def __init__(self, paths: list[str]):
        # the common folder ("ROOT/train/"), not a common name start ("ROOT/train/n0")
        self.root = os.path.commonprefix([min(paths), max(paths)] if paths else [""])
        self.root = self.root[: self.root.rfind("/") + 1]
        cut = len(self.root)
        parts = [p[cut:].encode("utf-8", "surrogateescape") for p in paths]
        self._ends = np.cumsum([len(b) for b in parts], dtype=np.int64)
        self._blob = b"".join(parts)

    def __len__(self) -> int:
        return len(self._ends)

    def relative(self, i: int) -> str:
        """Path i after `self.root`."""
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start: int(self._ends[i])].decode("utf-8", "surrogateescape")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path {i} of {len(self)}")
        return self.root + self.relative(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# ------------------------------------------------------------ tar shards
MANIFEST = "manifest.json"
FORMAT = "rotnet-shards"
FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"              # DALI's wds2idx index format
LABEL_EXT = "cls"


def shard_files(i: int) -> tuple[str, str]:
    """(tar, index) file names of shard i."""
    return f"shard-{i:06d}.tar", f"shard-{i:06d}.idx"


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

