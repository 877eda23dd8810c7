"""Which files a loader reads: folder listing, file lists, per-class subsets, shard arithmetic.

ImageNet layout: SPLIT/CLASS/IMAGE. Class index = position of CLASS in sorted folder order
(what torchvision's ImageFolder does), so indices agree between the train and val splits.

File lists (written by `python -m pipelines.scan`, read here) have one `relative/path label`
line per image, the path relative to the split folder; the label is the last whitespace
separated token, so paths may contain spaces. `data.file_list` may contain `{split}`, which
is replaced by the split folder's name, so one config value serves train and val.
"""
from __future__ import annotations

import os
import warnings

import torch

# Same set as torchvision.datasets.folder.IMG_EXTENSIONS; compared case-insensitively,
# so ImageNet's upper-case ".JPEG" is found.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """An image file cannot be decoded (or a split cannot be listed); the message names it."""


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def class_folders(root_split: str) -> list[str]:
    """Sorted class folder names of a split; a clear error if the split is missing or empty."""
    if not os.path.isdir(root_split):
        raise FileNotFoundError(f"image folder not found: {root_split!r}")
    names = sorted(e.name for e in os.scandir(root_split) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise BadImageError(f"{root_split!r} has no class folders (expected SPLIT/CLASS/IMAGE layout)")
    return names


def read_file_list(path: str) -> tuple[list[str], list[int]]:
    """Parse `relative/path label` lines (blank lines and '#' comments skipped)."""
    rel, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
            rel.append(parts[0])
            labels.append(int(parts[1]))
    return rel, labels


def write_file_list(path: str, rel_paths: list[str], labels: list[int]) -> None:
    """Write the format `read_file_list` (and DALI's readers.file file_list) reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, lab in zip(rel_paths, labels):
            if "\n" in p:
                raise ValueError(f"newline in file name cannot go in a file list: {p!r}")
            f.write(f"{p} {lab}\n")


def list_images(root_split: str, file_list: str = "") -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class_names) of a split, paths absolute, in sorted (class, name) order.

    Non-image files (by extension) and hidden files are skipped. An empty class folder is
    skipped with a warning naming it but keeps its class index, so labels still agree with
    the other split. With `file_list`, the images are that list's lines (paths relative to
    `root_split`); class names still come from the split's folders when it has them.
    """
    root_split = os.path.abspath(root_split)
    if file_list:
        rel, labels = read_file_list(file_list)
        if not rel:
            raise BadImageError(f"file list {file_list!r} has no entries")
        classes = class_folders(root_split) if os.path.isdir(root_split) else []
        if not classes:
            classes = [str(i) for i in range(max(labels) + 1)]
        return [os.path.join(root_split, p) for p in rel], labels, classes
    classes = class_folders(root_split)
    paths, labels, empty = [], [], []
    for idx, name in enumerate(classes):
        folder = os.path.join(root_split, name)
        files = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
        if not files:
            empty.append(folder)
        paths.extend(files)
        labels.extend([idx] * len(files))
    if empty:
        warnings.warn(f"skipping {len(empty)} class folder(s) without images (class index kept): "
                      + ", ".join(repr(e) for e in empty[:5]) + (" ..." if len(empty) > 5 else ""))
    if not paths:
        raise BadImageError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root_split!r}")
    return paths, labels, classes


def resolve_file_list(file_list: str, split_dir: str, train_dir: str) -> str:
    """The file list that applies to `split_dir` ('' for none).

    `{split}` in the value is replaced by the split folder name. A value without `{split}`
    applies to the train split only (it was scanned from one split; using it for val
    would read train images as validation).
    """
    if not file_list:
        return ""
    split = os.path.basename(os.path.normpath(split_dir))
    if "{split}" in file_list:
        return file_list.replace("{split}", split)
    return file_list if split == os.path.basename(os.path.normpath(train_dir)) else ""


def subset_per_class(labels: list[int], per_class: int, seed: int) -> list[int]:
    """Indices of a seeded random subset of `per_class` images of every class, sorted.

    Deterministic in (labels, per_class, seed) only, so every rank picks the same subset.
    A class with fewer images contributes all of them (with a warning).
    """
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    chosen, short = [], []
    for lab in sorted(by_class):
        idx = by_class[lab]
        perm = torch.randperm(len(idx), generator=g).tolist()
        if len(idx) < per_class:
            short.append(lab)
        chosen.extend(idx[j] for j in perm[:per_class])
    if short:
        warnings.warn(f"labels_per_class={per_class}: classes {short[:10]} have fewer images; using all of them")
    return sorted(chosen)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of shard `rank` of `n` items: DALI's formula (floor(n*r/W)), sizes differ by <= 1."""
    return n * rank // world_size, n * (rank + 1) // world_size

