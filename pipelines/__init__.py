"""Input pipelines for RotNet pretraining and probes: DALI or pure-torch backends.

    loader = build_rotation_loader(cfg, split_dir, batch_size=N, train=True, seed=cfg.train.seed,
                                   info=info)      # info: this rank's DistInfo (default: one CPU process)
    cfg = with_data_root(cfg, require=("train",))   # data.root "" -> the built-in sample set
    loader, val_loader = rotation_loaders(cfg, info)   # a pretraining run's pair (train.build_run)
    train, val = class_loaders(p)     # a probe's pair; p: its protocol (probes/protocol.py)
    for images, labels in loader:                 # the contract: pipelines/batch.py
        x = prepare_batch(images, cfg.data, channels_last=True)

`cfg` is a rotnet.config.Config: cfg.data says what is read (the numbers), cfg.loader how (speed).
data.format "folder" (SPLIT/CLASS/IMAGE) or "shards" (tar shards of `python -m pipelines.pack_shards`):
the same contract either way. Details (ordering, sharding, validation coverage, bad files):
docs/pipelines.md.

Read in this order: batch.py (what a batch is), recipe.py (the reference recipe, in torch),
torch_loader.py or dali_graph.py + dali_loader.py (how each backend makes it), listing.py (which
files and shards are read). Command-line tools: scan.py, pack_shards.py, imagenet_val.py, sample_data.py.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from pipelines.batch import (
    LoaderSpec,
    batch_preparer,
    check_recipe,
    derive_seed,
    normalize_in_graph,
    prepare_batch,
)
from pipelines.listing import (
    CLASSES,
    BadImageError,
    PathTable,
    SplitLayoutError,
    layout_error,
    list_images,
    list_shards,
    split_layout,
)
from rotnet.cli import InputError
from rotnet.config import Config, ConfigError, override
from rotnet.distributed import DistInfo

__all__ = ["with_data_root", "rotation_loaders", "class_loaders", "build_rotation_loader",
           "build_class_loader", "prepare_batch", "batch_preparer", "list_images", "BadImageError",
           "SplitLayoutError", "resolve_backend", "class_labels_missing"]


def with_data_root(cfg: Config, require: tuple[str, ...] = ()) -> Config:
    """cfg with data.root set (an empty one: the built-in sample set, `pipelines.sample_data`); ConfigError
    if a `require`d split folder is missing, before anything is written."""
    # imported here, as in resolve_backend: `python -m pipelines.sample_data` would warn otherwise
    from pipelines.sample_data import ensure_sample_data

    root = cfg.data.root or str(ensure_sample_data())
    for split in require:
        if not (Path(root) / split).is_dir():
            raise ConfigError(f"data.root={root!r} has no {split}/ folder; set "
                              "data.root=/path/to/dataset (ImageNet layout: SPLIT/CLASS/IMAGE.JPEG)")
    return override(cfg, {"data.root": root})


def resolve_backend(name: str) -> str:
    """'auto' -> 'dali' when nvidia.dali imports, else 'torch'; 'dali' without DALI -> error."""
    # imported here: `python -m pipelines.scan` makes runpy warn when the package imported scan first
    from pipelines.scan import dali_available

    if name not in ("auto", "dali", "torch"):
        raise ValueError(f"loader.backend={name!r}; expected auto, dali or torch")
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise InputError("loader.backend='dali' but nvidia.dali cannot be imported: install "
                         "nvidia-dali-cuda120 (or -cuda130), or set loader.backend=torch")
    return name


def _list(data, split_dir, mode):
    """(paths, labels, classes, ShardSet or None) of a split, per data.format; a flat folder only for
    rotation loaders (class labels unused)."""
    if data.format == "shards":
        if data.file_list:
            raise InputError(f"data.file_list={data.file_list!r} applies to image folders; with "
                             "data.format=shards pack the list instead: "
                             "python -m pipelines.pack_shards SPLIT_DIR --file-list LIST --out DIR")
        return list_shards(split_dir)
    if data.format != "folder":
        raise ValueError(f"data.format={data.format!r}; expected folder or shards")
    file_list = resolve_file_list(data.file_list, split_dir, data.train_dir)
    return (*list_images(split_dir, file_list, labelled=mode == "class", class_dir=_train_split(data)), None)


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


def _build(cfg, split_dir, mode, info, *, batch_size, train, seed, labels_per_class=0):
    """The loader's LoaderSpec, built once, handed to the backend that `cfg.loader` selects, on
    `info`'s rank and device."""
    data, how = cfg.data, cfg.loader
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}")
    check_recipe(data)
    paths, labels, classes, shards = _list(data, split_dir, mode)
    if labels_per_class > 0:
        keep = subset_per_class(labels, labels_per_class, derive_seed(seed, "subset"))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        shards = shards.subset(keep) if shards is not None else None
    device = torch.device(info.device)
    spec = LoaderSpec(data=data, loader=how, mode=mode, rotations=tuple(data.rotations),
                      batch_size=batch_size, rank=info.rank, world_size=info.world_size,
                      local_rank=info.local_rank, device=device, train=train, seed=seed,
                      normalize=normalize_in_graph(how.normalize, device), split_dir=split_dir,
                      paths=PathTable(paths), labels=tuple(labels), classes=tuple(classes), shards=shards)
    if how.resident or resolve_backend(how.backend) == "torch":   # resident images: torch ops only
        from pipelines.torch_loader import TorchLoader

        return TorchLoader(spec)
    from pipelines.dali_loader import DaliLoader

    return DaliLoader(spec)


def subset_per_class(labels: list[int], per_class: int, seed: int) -> list[int]:
    """Indices of a seeded random subset of `per_class` images of every class, sorted. Deterministic in
    (labels, per_class, seed) only, so every rank picks the same subset; a class with fewer images
    contributes all of them (with a warning)."""
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
        warnings.warn(f"labels_per_class={per_class}: classes {short[:10]} have fewer: all used")
    return sorted(chosen)


def _train_split(data) -> str:
    """data.root's train split ('' before data.root is set): a flat split's file list indexes its classes."""
    return os.path.join(data.root, data.train_dir) if data.root else ""


def class_labels_missing(data, split_dir: str) -> str:
    """'' when a class loader can read `split_dir`, else why not, in one line naming the fix.

    A class loader needs a file list (data.file_list) or class folders; a flat split (ImageNet's
    val as extracted) has neither until `python -m pipelines.imagenet_val` converts it.
    """
    if not os.path.isdir(split_dir):
        return f"{split_dir} does not exist"
    if data.format == "shards":     # the packer stores each image's class; list_shards checks the folder
        return ""
    if resolve_file_list(data.file_list, split_dir, data.train_dir):
        return ""
    layout = split_layout(split_dir)
    return "" if layout == CLASSES else str(layout_error(split_dir, layout))


def build_rotation_loader(cfg, split_dir: str, *, batch_size: int, train: bool, seed: int,
                          info: DistInfo = DistInfo()):
    """Rotation-prediction batches of `info`'s rank: (K*N images, rotation labels); see the module
    docstring. batch_size: N original images per rank; train: the train recipe and a shuffled order."""
    return _build(cfg, split_dir, cfg.data.rotation_mode, info, batch_size=batch_size, train=train,
                  seed=seed)


def build_class_loader(cfg, split_dir: str, *, batch_size: int, train: bool, seed: int,
                       info: DistInfo = DistInfo(), labels_per_class: int = 0):
    """Class-labelled batches of N crops of `info`'s rank (probes). labels_per_class=K>0: seeded
    K-per-class subset."""
    return _build(cfg, split_dir, "class", info, batch_size=batch_size, train=train, seed=seed,
                  labels_per_class=labels_per_class)


def rotation_loaders(cfg, info, val: bool = True):
    """A pretraining run's (train, held-out or None) rotation loaders for `info`'s rank, at
    optim.batch_size_per_gpu and train.seed: held-out batches only when `val`,
    train.eval_rotation_every asks for them and data.val_dir exists (a flat val/ will do)."""
    root = Path(cfg.data.root)
    common = dict(batch_size=cfg.optim.batch_size_per_gpu, seed=cfg.train.seed, info=info)
    train = build_rotation_loader(cfg, str(root / cfg.data.train_dir), train=True, **common)
    if not (val and cfg.train.eval_rotation_every and (root / cfg.data.val_dir).is_dir()):
        return train, None
    return train, build_rotation_loader(cfg, str(root / cfg.data.val_dir), train=False, **common)


def class_loaders(p, *, augment: bool = True, val_per_class: int = 0):
    """A probe's or the kNN monitor's (train, val) class loaders for `p.info`'s rank, with the same classes.
    p: the probe's settings (probes.protocol.Protocol): p.cfg, p.info, p.batch_size, p.seed and
    p.labels_per_class, train's seeded K-per-class subset if > 0. augment=False reads train with the
    eval recipe (a kNN bank); val_per_class K > 0: a seeded K-per-class val subset."""
    cfg = p.cfg
    root, d = Path(cfg.data.root), cfg.data
    common = dict(batch_size=p.batch_size, seed=p.seed, info=p.info)
    train = build_class_loader(cfg, str(root / d.train_dir), train=augment,
                               labels_per_class=p.labels_per_class, **common)
    val = build_class_loader(cfg, str(root / d.val_dir), train=False, labels_per_class=val_per_class,
                             **common)
    if list(train.classes) != list(val.classes):
        raise InputError(f"class folders of {root / d.train_dir} and {root / d.val_dir} differ "
                         f"({len(train.classes)} vs {len(val.classes)} classes)")
    return train, val
